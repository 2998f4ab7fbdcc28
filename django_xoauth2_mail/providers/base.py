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
from typing import Any, ClassVar, Literal
from urllib.parse import urlencode

import requests
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from django_xoauth2_mail.conf import conf

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


@dataclasses.dataclass(frozen=True)
class SMTPEndpoint:
    host: str
    port: int
    security: SMTPSecurity
    ca_file: str | None = None


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
        return SMTPEndpoint(
            host=self.settings.get("SMTP_HOST", default.host),
            port=int(self.settings.get("SMTP_PORT", default.port)),
            security=self.settings.get("SMTP_SECURITY", default.security),
            ca_file=self.settings.get("SMTP_CA_FILE", default.ca_file),
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
    return f"{endpoint}?{urlencode(params)}"


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
    return parse_token_response(url, response.status_code, response.text)


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
def parse_token_response(url: str, status: int, body: str) -> dict[str, Any]:
    payload = json_object(url, status, body)
    if status == 200 and "error" not in payload:
        if not isinstance(payload.get("access_token"), str):
            raise TokenEndpointError(
                f"the token endpoint {url} answered without an access_token", retryable=False
            )
        return payload
    error = str(payload.get("error", f"HTTP {status}"))
    description = payload.get("error_description")
    detail = f"{error}: {description}" if description else error
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
