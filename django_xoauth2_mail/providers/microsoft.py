"""Outlook.com and Microsoft 365, through msal.

Delegated mailboxes hold a refresh token from a person's consent; Microsoft rotates it on
every refresh, so the new one is always returned (tokens.py saves it with the access
token, under the row lock). With ``APP_ONLY`` the app's own client-credentials token
sends for every mailbox of the tenant that has no refresh token.

The Mailbox row is the token cache: each call builds a fresh msal application with a fresh
in-memory cache, so msal never hands back a token the SMTP server just refused, and its
HTTP throttling cache (which replays a 5xx for seconds) never outlives one attempt.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import msal
import requests
from django.views.decorators.debug import sensitive_variables
from msal.authority import WELL_KNOWN_AUTHORITY_HOSTS
from msal.exceptions import MsalServiceError

from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.exceptions import ConfigurationError
from django_xoauth2_mail.providers.base import (
    ConsentResult,
    DeviceFlow,
    DeviceFlowDenied,
    DeviceFlowExpired,
    GrantRevoked,
    Provider,
    SMTPEndpoint,
    TokenEndpointError,
    TokenResult,
    expiry_from,
    url_with_query,
)
from django_xoauth2_mail.providers.library_logs import (
    MSAL_CREDENTIAL_LOGGERS,
    credentials_kept_out_of_debug_logs,
)
from django_xoauth2_mail.providers.microsoft_claims import consenting_account
from django_xoauth2_mail.providers.scrub import scrub, scrub_payload

SMTP_SCOPE = "https://outlook.office.com/SMTP.Send"
APP_ONLY_SCOPE = "https://outlook.office365.com/.default"
DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
# msal adds these to every user-token request itself, and raises ValueError when given them.
MSAL_RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access"})
# Tenants that name a kind of account rather than one directory.
MULTI_TENANT = frozenset({"common", "organizations", "consumers"})
# Errors that only a person signing in again can clear (AADSTS700082 expired refresh
# token, AADSTS50173 password changed, AADSTS70000, MFA or consent now required, ...).
REVOKED_ERRORS = frozenset({"invalid_grant", "interaction_required", "consent_required"})
RETRYABLE_ERRORS = frozenset({"temporarily_unavailable", "server_error"})
HINTS = {
    "invalid_client": "the CLIENT_SECRET is wrong or expired: add a new one under Certificates "
    "& secrets in the app registration and update the setting",
    "unauthorized_client": "the app registration does not allow this flow: check its "
    "supported account types against TENANT, and 'Allow public client flows' without a secret",
    "invalid_scope": "the app registration lacks the permission: add SMTP.Send (delegated) or "
    "SMTP.SendAsApp (application, with admin consent) under API permissions",
}


class _Session(requests.Session):
    """The HTTP client msal gets: our timeout, and ``HTTP_CA_FILE`` (for a private PKI or a
    TLS-inspecting proxy, and for tests) on every request. Set on the session alone, as
    msal's ``verify=`` does, a CA file loses to REQUESTS_CA_BUNDLE (psf/requests#3829)."""

    def __init__(self, ca_file: str | None) -> None:
        super().__init__()
        self.ca_file = ca_file

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["timeout"] = conf.HTTP_TIMEOUT
        if self.ca_file:
            kwargs["verify"] = self.ca_file
        return super().request(*args, **kwargs)


class MicrosoftProvider(Provider):
    id = "microsoft"
    name = "Microsoft"
    default_smtp = SMTPEndpoint(host="smtp.office365.com", port=587, security="starttls")
    default_scopes = (SMTP_SCOPE,)
    # Exchange Online accepts 30 messages a minute from one mailbox, and refuses a
    # 4th concurrent SMTP session ("432 4.3.2 ... sender thread limit exceeded").
    # Both are the defaults of RATE_LIMIT and MAX_SESSIONS, enforced across every
    # process and machine that shares the database (sending/limits.py).
    default_rate_limit = 30
    max_sessions_per_mailbox = 3

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[tuple[str, str]]:
        problems = []
        if settings.get("APP_ONLY"):
            if not settings.get("CLIENT_SECRET"):
                problems.append(("APP_ONLY needs a CLIENT_SECRET.", "Create one in Entra ID."))
            if str(settings.get("TENANT") or "common") in ("common", "organizations", "consumers"):
                problems.append(
                    (
                        "APP_ONLY needs TENANT set to your tenant's id or domain.",
                        "App-only tokens are issued by one tenant, never by 'common'.",
                    )
                )
        ca_file = settings.get("HTTP_CA_FILE")
        if ca_file and not (isinstance(ca_file, str) and os.path.isfile(ca_file)):
            problems.append((f"HTTP_CA_FILE {ca_file!r} is not a readable file.", ""))
        return problems

    @property
    def consent_free(self) -> bool:
        return bool(self.settings.get("APP_ONLY"))

    @property
    def authority(self) -> str:
        host = str(self.settings.get("AUTHORITY_HOST") or DEFAULT_AUTHORITY_HOST).rstrip("/")
        if "://" not in host:
            host = f"https://{host}"
        return f"{host}/{self.settings.get('TENANT') or 'common'}"

    @property
    def user_scopes(self) -> list[str]:
        return [scope for scope in self.scopes if scope not in MSAL_RESERVED_SCOPES]

    def _application(self, *, public: bool = False) -> Any:
        """A new msal application (its constructor fetches the discovery document)."""
        client_id = str(self.settings.get("CLIENT_ID") or "")
        if not client_id:
            raise ConfigurationError(
                "XOAUTH2_MAIL['PROVIDERS']['microsoft'] has no CLIENT_ID: copy the "
                "Application (client) ID of your Entra app registration."
            )
        options: dict[str, Any] = {
            "authority": self.authority,
            # Instance discovery asks login.microsoftonline.com about any host msal does
            # not know: skip it for private authority hosts (and the test server).
            "instance_discovery": None
            if urlsplit(self.authority).hostname in WELL_KNOWN_AUTHORITY_HOSTS
            else False,
            "http_client": _Session(self.settings.get("HTTP_CA_FILE")),
            "token_cache": msal.TokenCache(),
        }
        secret = self.settings.get("CLIENT_SECRET")
        if secret and not public:
            return msal.ConfidentialClientApplication(
                client_id, client_credential=secret, **options
            )
        return msal.PublicClientApplication(client_id, **options)

    # Refresh ---------------------------------------------------------------

    def refresh_access_token(self, email: str, refresh_token: str | None) -> TokenResult:
        if not refresh_token and not self.settings.get("APP_ONLY"):
            raise ConfigurationError(
                f"The Microsoft mailbox {email} has no refresh token. Connect it with `python "
                f"manage.py connect_mailbox microsoft --email {email}`, or set APP_ONLY (with "
                "a TENANT id and CLIENT_SECRET) in XOAUTH2_MAIL['PROVIDERS']['microsoft'] to "
                "send with the app's own token."
            )
        if refresh_token:
            result = self._acquire(
                lambda app: app.acquire_token_by_refresh_token(
                    refresh_token, scopes=self.user_scopes
                ),
                secrets=[refresh_token],
            )
        else:
            secrets = self._secrets()
            with _msal_call(self.authority, secrets):
                # SCOPES replaces the resource's .default scope in national clouds.
                scopes = list(self.settings.get("SCOPES") or [APP_ONLY_SCOPE])
                result = self._app_only_application().acquire_token_for_client(scopes=scopes)
            result = _scrubbed(result, secrets)
        # Microsoft rotates refresh tokens (the old one may stop working): this is the new one.
        return TokenResult(**_token_fields(result))

    @sensitive_variables()
    def _secrets(self, *sent: str | None) -> list[str | None]:
        """What a request to Microsoft carries that its answer must not repeat."""
        return [str(self.settings.get("CLIENT_SECRET") or ""), *sent]

    @sensitive_variables()
    def _acquire(
        self, call: Callable[[Any], dict[str, Any]], *, secrets: Iterable[str | None]
    ) -> dict[str, Any]:
        """``call(app)`` with the app as configured, then as a public client if Entra says
        the grant belongs to one: a secret is refused (AADSTS700025) for tokens from the
        device code flow and codes sent to a "Mobile and desktop" redirect URI.

        An error answer comes back with ``secrets`` (and the client secret) scrubbed."""
        secrets = self._secrets(*secrets)
        with _msal_call(self.authority, secrets):
            result = call(self._application())
            if _issued_to_public_client(result) and self.settings.get("CLIENT_SECRET"):
                result = call(self._application(public=True))
        return _scrubbed(result, secrets)

    def _app_only_application(self) -> Any:
        tenant = str(self.settings.get("TENANT") or "common")
        if tenant.lower() in MULTI_TENANT or not self.settings.get("CLIENT_SECRET"):
            raise ConfigurationError(
                "XOAUTH2_MAIL['PROVIDERS']['microsoft'] has APP_ONLY set: it also needs "
                "CLIENT_SECRET and TENANT set to your directory's tenant id or domain (not "
                f"{tenant!r}), since an app-only token belongs to one tenant."
            )
        return self._application()

    # Consent: authorization code + PKCE, and the device code flow --------------

    @property
    def consent_scopes(self) -> list[str]:
        # email: the ID token then carries the mailbox address (preferred_username is
        # the sign-in name, which can differ from it).
        return list(dict.fromkeys([*self.user_scopes, "email"]))

    def authorization_url(
        self, *, redirect_uri: str, state: str, code_challenge: str, login_hint: str | None = None
    ) -> str:
        # msal's initiate_auth_code_flow makes its own state and PKCE pair, and its
        # get_authorization_request_url is deprecated: build the URL on the endpoint
        # msal found in the discovery document (this also checks TENANT early).
        with _msal_call(self.authority):
            endpoint = self._application().authority.authorization_endpoint
        params = {
            "client_id": str(self.settings.get("CLIENT_ID")),
            "response_type": "code",
            "response_mode": "query",
            "redirect_uri": redirect_uri,
            "scope": " ".join([*self.consent_scopes, *sorted(MSAL_RESERVED_SCOPES)]),
            "state": state,
            "code_challenge": code_challenge,
            "code_challenge_method": "S256",
        }
        # Without a hint, let the person pick the mailbox's account, not whichever
        # account their browser is signed in to.
        params.update({"login_hint": login_hint} if login_hint else {"prompt": "select_account"})
        return url_with_query(endpoint, params)

    @sensitive_variables()
    def exchange_code(self, *, code: str, redirect_uri: str, code_verifier: str) -> ConsentResult:
        def redeem(app: Any) -> dict[str, Any]:
            # The one msal call that takes our code_verifier. It and the client under it
            # warn that they are deprecated for the flow that makes its own PKCE pair.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"msal\.")
                result: dict[str, Any] = app.acquire_token_by_authorization_code(
                    code,
                    scopes=self.consent_scopes,
                    redirect_uri=redirect_uri,
                    data={"code_verifier": code_verifier},
                )
            return result

        return _consent_result(self._acquire(redeem, secrets=[code, code_verifier]))

    supports_device_flow = True

    def start_device_flow(self) -> DeviceFlow:
        """Ask for a user code; the person enters it at Microsoft's page and consents."""
        with _msal_call(self.authority, self._secrets()):
            app = self._application(public=True)
            flow: dict[str, Any] = app.initiate_device_flow(scopes=self.consent_scopes)
        flow = _scrubbed(flow, self._secrets())
        if "user_code" not in flow:
            raise TokenEndpointError(
                f"Microsoft did not start the device code flow ({_detail(flow)}). In the app "
                "registration, turn on Authentication > Allow public client flows.",
                retryable=False,
            )
        return DeviceFlow(
            verification_uri=str(flow.get("verification_uri", "")),
            user_code=str(flow["user_code"]),
            expires_at=dt.datetime.fromtimestamp(float(flow["expires_at"]), tz=dt.UTC),
            message=str(flow.get("message") or ""),
            state=flow,
        )

    def finish_device_flow(self, flow: DeviceFlow, *, timeout: float) -> ConsentResult:
        """Poll until the person consented, refused, or ``timeout`` seconds passed."""
        state = dict(flow.state)
        # msal polls until state["expires_at"]; moving it earlier is its documented abort.
        state["expires_at"] = min(float(state.get("expires_at", 0)), time.time() + timeout)
        secrets = self._secrets(str(state.get("device_code") or ""))
        with _msal_call(self.authority, secrets):
            result = self._application(public=True).acquire_token_by_device_flow(state)
        result = _scrubbed(result, secrets)
        if result.get("error") in ("authorization_pending", "slow_down", "expired_token"):
            raise DeviceFlowExpired(
                f"nobody entered the code {flow.user_code} at {flow.verification_uri} in time",
                retryable=False,
            )
        if result.get("error") in ("authorization_declined", "access_denied"):
            raise DeviceFlowDenied(_detail(result), retryable=False)
        return _consent_result(result)


def _scrubbed(result: dict[str, Any], secrets: Iterable[str | None]) -> dict[str, Any]:
    """msal's answer; an error answer with the request's secrets taken out of its text
    (an endpoint or a proxy may echo the request in error_description)."""
    return scrub_payload(result, secrets) if "error" in result else result


@contextlib.contextmanager
def _msal_call(authority: str, secrets: Iterable[str | None] = ()) -> Iterator[None]:
    """Around every msal call: msal's DEBUG log of the code, verifier and device code kept
    out (library_logs.py), and what msal raises turned into the provider exceptions, with
    ``secrets`` scrubbed from any text msal took from an answer."""
    with (
        credentials_kept_out_of_debug_logs(MSAL_CREDENTIAL_LOGGERS),
        _msal_errors(authority, secrets),
    ):
        yield


@contextlib.contextmanager
def _msal_errors(authority: str, secrets: Iterable[str | None] = ()) -> Iterator[None]:
    """Turn what msal (and requests under it) raise into the provider exceptions, with
    ``secrets`` scrubbed from any text msal took from an answer."""
    where = f"Microsoft's sign-in service {authority}"
    secrets = list(secrets)
    try:
        yield
    except requests.exceptions.SSLError:
        raise TokenEndpointError(
            f"The TLS certificate of {where} is not trusted. Behind a private PKI or a "
            "TLS-inspecting proxy, point HTTP_CA_FILE at its CA bundle.",
            retryable=False,
        ) from None
    except requests.Timeout:
        raise TokenEndpointError(
            f"{where} did not answer within {conf.HTTP_TIMEOUT:g} s", retryable=True
        ) from None
    except requests.RequestException as exc:
        raise TokenEndpointError(
            f"{where} could not be reached ({type(exc).__name__})", retryable=True
        ) from None
    except MsalServiceError as exc:  # what msal raises for any 5xx
        raise TokenEndpointError(
            f"{where} failed ({scrub(str(exc), secrets)})", retryable=True
        ) from None
    except json.JSONDecodeError:
        raise TokenEndpointError(
            f"{where} answered with something that is not JSON (check AUTHORITY_HOST)",
            retryable=False,
        ) from None
    except ValueError as exc:  # e.g. an unknown tenant: its discovery document is a 400
        first_line = (scrub(str(exc), secrets).strip().splitlines() or [type(exc).__name__])[0]
        raise TokenEndpointError(
            f"{where} cannot be used ({first_line}); check the TENANT and AUTHORITY_HOST settings",
            retryable=False,
        ) from None


def _issued_to_public_client(result: dict[str, Any]) -> bool:
    """Entra refuses the client secret when refreshing a token the device code flow (a
    public client) obtained: AADSTS700025. That token is then refreshed without it."""
    return result.get("error") == "invalid_client" and (
        700025 in (result.get("error_codes") or [])
        or str(result.get("error_description", "")).startswith("AADSTS700025")
    )


def _detail(result: dict[str, Any]) -> str:
    """``error: first line of error_description`` (the rest is trace and correlation ids)."""
    description = str(result.get("error_description") or "").strip()
    error = str(result.get("error", "no error code"))
    return f"{error}: {description.splitlines()[0]}" if description else error


def _token_fields(result: dict[str, Any]) -> dict[str, Any]:
    """The fields of a TokenResult from msal's answer, or the error it carries."""
    error = result.get("error")
    if error in REVOKED_ERRORS:
        raise GrantRevoked(_detail(result))
    if error:
        hint = HINTS.get(str(error))
        message = f"Microsoft's token endpoint refused ({_detail(result)})"
        raise TokenEndpointError(
            f"{message}; {hint}" if hint else message, retryable=error in RETRYABLE_ERRORS
        )
    if not isinstance(result.get("access_token"), str):
        raise TokenEndpointError(
            "Microsoft's token endpoint answered without an access_token", retryable=False
        )
    return {
        "access_token": result["access_token"],
        "expires_at": expiry_from(result.get("expires_in")),
        "refresh_token": result.get("refresh_token") or None,
        "scopes": tuple(str(result.get("scope", "")).split()),
    }


def _consent_result(result: dict[str, Any]) -> ConsentResult:
    fields = _token_fields(result)
    account = consenting_account(result.get("id_token_claims") or {})
    return ConsentResult(
        email=account.email,
        email_verified=account.email_verified,
        account_id=account.account_id,
        **fields,
    )
