"""The interface every provider adapter implements.

A provider is the only code that knows an OAuth2 server: its token endpoint,
its scopes and its SMTP endpoint. Everything else in the package talks to
this interface. Provider errors are reported with the two exceptions below,
which the token layer turns into the user-facing ones.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import ipaddress
import json
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from django_xoauth2_mail.conf import SMTP_SECURITY_MODES, conf
from django_xoauth2_mail.exceptions import ConfigurationError
from django_xoauth2_mail.providers.scrub import form_secrets, scrub

SMTPSecurity = Literal["tls", "starttls", "none"]


class GrantRevoked(Exception):
    """The provider refused the grant for good (OAuth2 ``invalid_grant``)."""


class TokenEndpointError(Exception):
    """The token endpoint failed; ``retryable`` when trying again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class DeviceFlowDenied(TokenEndpointError):
    """The person refused on the provider's page (``access_denied``)."""


class DeviceFlowExpired(TokenEndpointError):
    """Nobody approved in time: the code expired, or the caller's timeout passed."""


def normalized_smtp_security(value: object) -> SMTPSecurity | None:
    """``value`` as one of the SMTP security modes (case and surrounding blanks do not
    matter), or None when it names none of them."""
    mode = value.strip().lower() if isinstance(value, str) else None
    return cast(SMTPSecurity, mode) if mode in SMTP_SECURITY_MODES else None


def smtp_security(value: object, *, setting: str) -> SMTPSecurity:
    """The SMTP security mode ``value`` names, or a ConfigurationError.

    Fails closed: an unknown value (``"ssl"``, a typo) must never become a connection
    without TLS, which would send the access token in clear.
    """
    mode = normalized_smtp_security(value)
    if mode is None:
        raise ConfigurationError(
            f"{setting} is {value!r}, which is not an SMTP security mode. Use 'tls' "
            "(implicit TLS, usually port 465), 'starttls' (usually port 587) or 'none' "
            "(plain TCP, for a server on this machine only). Nothing is sent until it is fixed."
        )
    return mode


@dataclasses.dataclass(frozen=True)
class SMTPEndpoint:
    host: str
    port: int
    security: SMTPSecurity
    ca_file: str | None = None
    # The provider's SASL_MECHANISM: "XOAUTH2", "OAUTHBEARER" or "auto" (XOAUTH2 when
    # the server offers it, else OAUTHBEARER).
    sasl_mechanism: str = "auto"

    def __post_init__(self) -> None:
        # Every endpoint is checked where it is built, whoever builds it: the session
        # trusts ``security`` to be one of the three modes.
        mode = smtp_security(self.security, setting="The SMTP endpoint's security")
        object.__setattr__(self, "security", mode)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (clear text that stays on this host)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class TokenResult:
    """A token endpoint's answer. ``refresh_token`` is set when it rotated."""

    access_token: str = dataclasses.field(repr=False)
    expires_at: dt.datetime
    refresh_token: str | None = dataclasses.field(default=None, repr=False)
    scopes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ConsentResult:
    """What a finished consent flow yields: the account and its first tokens."""

    email: str | None  # the account's address, when the provider told it
    access_token: str = dataclasses.field(repr=False)
    expires_at: dt.datetime
    refresh_token: str | None = dataclasses.field(default=None, repr=False)
    scopes: tuple[str, ...] = ()
    # False when ``email`` comes from a claim the provider does not vouch for (a
    # Microsoft tenant's administrator can give a user any address); None: not said.
    email_verified: bool | None = None
    # The provider's stable id of the account that consented, which survives a change
    # of address (Microsoft: "TENANT_ID/OBJECT_ID"); None where the provider gives none.
    account_id: str | None = None


@dataclasses.dataclass(frozen=True)
class DeviceFlow:
    """A started device-code flow (RFC 8628): what to show the person, and the
    provider's own state needed to finish it."""

    verification_uri: str
    user_code: str
    expires_at: dt.datetime
    message: str  # the provider's instructions, ready to print
    state: Mapping[str, Any] = dataclasses.field(repr=False, default_factory=dict)


class Provider:
    """Base class: subclasses set the class attributes and implement the refresh
    and, for providers that have a consent step, the authorization-code flow."""

    id: ClassVar[str]
    name: ClassVar[str]
    default_smtp: ClassVar[SMTPEndpoint]
    default_scopes: ClassVar[tuple[str, ...]] = ()
    # Concurrent SMTP sessions per mailbox the provider accepts (None: no limit);
    # caps the backend's max_connections. The MAX_SESSIONS setting overrides it.
    max_sessions_per_mailbox: ClassVar[int | None] = None
    # Messages per minute per mailbox the provider tolerates (None: no limit).
    default_rate_limit: ClassVar[int | None] = None
    # Settings keys this provider cannot work without (checked by checks.py).
    required_settings: ClassVar[tuple[str, ...]] = ("CLIENT_ID",)
    # Added to "could not be reached" errors: the likely cause, when there is one.
    unreachable_hint: ClassVar[str] = ""

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Provider-specific mistakes in ``settings``, as (message, hint) pairs,
        beyond the missing ``required_settings`` (reported by checks.py)."""
        return []

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings: Mapping[str, Any] = (
            settings if settings is not None else conf.provider_settings(self.id)
        )

    def __repr__(self) -> str:
        # Never show settings: they hold the client secret.
        return f"<{type(self).__name__} {self.id!r}>"

    @property
    def smtp_endpoint(self) -> SMTPEndpoint:
        default = self.default_smtp
        security = smtp_security(
            self.settings.get("SMTP_SECURITY", default.security),
            setting=f"XOAUTH2_MAIL['PROVIDERS'][{self.id!r}]['SMTP_SECURITY']",
        )
        return SMTPEndpoint(
            host=self.settings.get("SMTP_HOST", default.host),
            port=int(self.settings.get("SMTP_PORT", default.port)),
            security=security,
            ca_file=self.settings.get("SMTP_CA_FILE", default.ca_file),
            sasl_mechanism=str(self.settings.get("SASL_MECHANISM") or "auto"),
        )

    @property
    def rate_limit(self) -> int | None:
        value = self.settings.get("RATE_LIMIT", self.default_rate_limit)
        return int(value) if value else None

    @property
    def max_sessions(self) -> int | None:
        """Concurrent SMTP sessions per mailbox, across every process (sending/limits.py)."""
        value = self.settings.get("MAX_SESSIONS", self.max_sessions_per_mailbox)
        return int(value) if value else None

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(self.settings.get("SCOPES", self.default_scopes))

    def refresh_access_token(self, email: str, refresh_token: str | None) -> TokenResult:
        """Return a new access token for the mailbox ``email``.

        Raise :class:`GrantRevoked` when the grant is dead and
        :class:`TokenEndpointError` for anything else.
        """
        raise NotImplementedError

    # Consent (authorization code with PKCE S256). -------------------------

    def authorization_url(
        self, *, redirect_uri: str, state: str, code_challenge: str, login_hint: str | None = None
    ) -> str:
        """The provider's consent page for this request."""
        raise NotImplementedError

    def exchange_code(self, *, code: str, redirect_uri: str, code_verifier: str) -> ConsentResult:
        """Trade the authorization code for tokens (and the account's address)."""
        raise NotImplementedError

    # RFC 9207: the authorization server names itself in its answer (``iss``), so a
    # client talking to several servers can tell which one answered (mix-up defence).

    @property
    def issuer(self) -> str | None:
        """This server's issuer identifier, or None when it is not known here."""
        return None

    @property
    def requires_iss(self) -> bool:
        """True when the server always sends ``iss`` in its authorization responses (its
        metadata says ``authorization_response_iss_parameter_supported``): an answer
        without it then cannot be from this server."""
        return False

    @property
    def consent_free(self) -> bool:
        """True when this configuration mints tokens for any mailbox without a
        person's consent (Google service accounts, Microsoft app-only)."""
        return False

    # Device-code flow (RFC 8628), for providers that allow it for SMTP scopes.
    supports_device_flow: ClassVar[bool] = False

    def start_device_flow(self) -> DeviceFlow:
        raise NotImplementedError(f"{self.name} offers no device-code flow for SMTP.")

    def finish_device_flow(self, flow: DeviceFlow, *, timeout: float) -> ConsentResult:
        """Poll until the person approved (or refused, or ``timeout`` passed)."""
        raise NotImplementedError(f"{self.name} offers no device-code flow for SMTP.")

    def revoke_token(self, token: str) -> bool:
        """Revoke a refresh token at the provider; False where it offers no revocation."""
        return False


def check_reachable(url: str, *, hint: str = "") -> None:
    """Raise TokenEndpointError unless the server of ``url`` answers at all (any HTTP
    status, or a TLS handshake this process does not trust but the browser may), within
    HTTP_TIMEOUT: a cheap check before a person is sent to a page that cannot load, and
    left waiting for an answer that cannot come."""
    parts = urlsplit(url)
    bare = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    try:
        requests.head(bare, timeout=conf.HTTP_TIMEOUT, allow_redirects=False).close()
    except requests.exceptions.SSLError:
        return  # something listens there; whether to trust it is the browser's call
    except requests.Timeout:
        problem = f"did not answer within {conf.HTTP_TIMEOUT:g} s"
    except requests.RequestException as exc:
        problem = f"could not be reached ({type(exc).__name__})"
    else:
        return
    raise TokenEndpointError(
        f"the authorization server {parts.scheme}://{parts.netloc} {problem}"
        + (f". {hint}" if hint else ""),
        retryable=True,
    )


def authorization_request_url(
    endpoint: str,
    *,
    client_id: str,
    redirect_uri: str,
    scopes: Iterable[str],
    state: str,
    code_challenge: str,
    login_hint: str | None,
    **extra: str,
) -> str:
    """An authorization-code request with PKCE (S256), as RFC 6749 and 7636 spell it."""
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": " ".join(scopes),
        "state": state,
        "code_challenge": code_challenge,
        "code_challenge_method": "S256",
        **extra,
    }
    if login_hint:
        params["login_hint"] = login_hint
    return url_with_query(endpoint, params)


def url_with_query(url: str, params: Mapping[str, str]) -> str:
    """``url`` with ``params`` added to its query.

    RFC 6749 section 3.1: the query an authorization endpoint's URL already has must be
    kept when adding parameters (a second ``?`` would fold ours into its last value), and
    no parameter may appear twice, so one of ours replaces one of the same name there.
    """
    parts = urlsplit(url)
    kept = [
        (name, value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if name not in params
    ]
    return urlunsplit(parts._replace(query=urlencode([*kept, *params.items()])))


def expiry_from(expires_in: Any) -> dt.datetime:
    try:
        seconds = int(expires_in)
    except (TypeError, ValueError):
        raise TokenEndpointError(
            f"the token endpoint's answer has no usable expires_in ({expires_in!r})",
            retryable=False,
        ) from None
    return timezone.now() + dt.timedelta(seconds=seconds)


@sensitive_variables()
def post_token_request(url: str, data: Mapping[str, str]) -> dict[str, Any]:
    """POST a form to a token endpoint and return its JSON answer.

    Maps every failure to GrantRevoked or TokenEndpointError with a message
    that never includes the request (it holds secrets).
    """
    try:
        response = requests.post(url, data=dict(data), timeout=conf.HTTP_TIMEOUT)
    except requests.Timeout:
        raise TokenEndpointError(
            f"the token endpoint {url} did not answer within {conf.HTTP_TIMEOUT:g} s",
            retryable=True,
        ) from None
    except requests.RequestException as exc:
        raise TokenEndpointError(
            f"the token endpoint {url} could not be reached ({type(exc).__name__})",
            retryable=True,
        ) from None
    return parse_token_response(url, response.status_code, response.text, form_secrets(data))


@sensitive_variables()
def json_object(
    url: str,
    status: int,
    body: str | bytes,
    *,
    check: str = "the TOKEN_URL setting",
    retryable: bool | None = None,
) -> dict[str, Any]:
    """The JSON object an OAuth endpoint answered, or a TokenEndpointError that says
    what came instead (an HTML error page, truncated JSON ...) and what to check."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise TokenEndpointError(
            f"the endpoint {url} answered HTTP {status} with something that is not "
            f"a JSON object (check {check})",
            retryable=status >= 500 if retryable is None else retryable,
        )
    return payload


@sensitive_variables()
def parse_token_response(
    url: str, status: int, body: str, secrets: Iterable[str] = ()
) -> dict[str, Any]:
    """The token answer, or the provider's refusal with ``secrets`` (what the request
    carried) scrubbed from its text: an endpoint may echo the request."""
    payload = json_object(url, status, body)
    if status == 200 and "error" not in payload:
        if not isinstance(payload.get("access_token"), str):
            raise TokenEndpointError(
                f"the token endpoint {url} answered without an access_token", retryable=False
            )
        return payload
    error = str(payload.get("error", f"HTTP {status}"))
    description = payload.get("error_description")
    detail = scrub(f"{error}: {description}" if description else error, secrets)
    if error == "invalid_grant":
        raise GrantRevoked(detail)
    raise TokenEndpointError(
        f"the token endpoint {url} refused the refresh ({detail})",
        retryable=status >= 500 or status == 429,
    )


def id_token_claims(id_token: Any) -> dict[str, Any]:
    """The claims of an ID token received straight from the token endpoint.

    Its signature is not checked: OpenID Connect Core 3.1.3.7 lets a client
    trust an ID token it got directly from the token endpoint over TLS.
    """
    if not isinstance(id_token, str) or id_token.count(".") < 2:
        return {}
    payload = id_token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}
