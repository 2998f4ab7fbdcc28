"""Gmail and Google Workspace, through google-auth.

One provider serves two kinds of mailbox:

* an account that a person connected once through consent: the Mailbox row holds its
  refresh token, refreshed with ``google.oauth2.credentials.Credentials``;
* a Workspace account reached through a service account with domain-wide delegation
  (``SERVICE_ACCOUNT_FILE`` or ``SERVICE_ACCOUNT_INFO``): the row has no refresh token and
  the service account signs a JWT naming the mailbox as its subject. One service account
  serves every mailbox of the domain.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import google.auth.transport.requests
import google.oauth2.credentials
import google.oauth2.service_account
import requests
from django.views.decorators.debug import sensitive_variables
from google.auth import exceptions as google_errors

from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.exceptions import ConfigurationError
from django_xoauth2_mail.providers.base import (
    ConsentResult,
    GrantRevoked,
    Provider,
    SMTPEndpoint,
    TokenEndpointError,
    TokenResult,
    authorization_request_url,
    expiry_from,
    id_token_claims,
    json_object,
    post_token_request,
)
from django_xoauth2_mail.providers.library_logs import (
    GOOGLE_CREDENTIAL_LOGGERS,
    credentials_kept_out_of_debug_logs,
)
from django_xoauth2_mail.providers.scrub import form_secrets, scrub

MAIL_SCOPE = "https://mail.google.com/"
GOOGLE_ISSUER = "https://accounts.google.com"
DEFAULTS = {
    "TOKEN_URL": "https://oauth2.googleapis.com/token",
    "AUTHORIZATION_URL": "https://accounts.google.com/o/oauth2/v2/auth",
    "REVOCATION_URL": "https://oauth2.googleapis.com/revoke",
}
# What google-auth itself would retry (google.auth.transport.DEFAULT_RETRYABLE_STATUS_CODES).
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_HINTS = {
    "invalid_client": "CLIENT_ID or CLIENT_SECRET is wrong, or the OAuth client was deleted: "
    "compare them with Google Cloud console > APIs & Services > Credentials",
    "unauthorized_client": "the refresh token was issued to another OAuth client (did "
    "CLIENT_ID change?): reconnect the mailbox",
    "admin_policy_enforced": "the Workspace administrator blocks this app or the Gmail "
    "scope: an admin must trust the app in Admin console > Security > API controls",
}
_DELEGATION_HINT = (
    "check that {email} is an active user of the Workspace domain, that the service "
    "account's client ID is authorized for https://mail.google.com/ in Admin console > "
    "Security > API controls > Domain-wide delegation, that its key is not deleted, and that "
    "this server's clock is right"
)


class _TokenEndpointRequest(google.auth.transport.requests.Request):
    """google-auth's requests transport with our timeout, failing fast on outages.

    google-auth retries a 5xx three times with 1-2 s pauses, then reports an HTML error
    page as not retryable, and crashes with TypeError on a 200 that is not JSON. The
    retry policy belongs to tokens.py (it runs with the mailbox row locked), so an
    outage or a garbage answer is raised here as TokenEndpointError, which google-auth
    does not catch; JSON error answers still reach google-auth and come out as
    RefreshError.

    It also keeps the secrets each request carried (``sent_secrets``: the refresh
    token, client secret, or the service-account assertion google-auth signs), so
    the refusal's text can be scrubbed of them.
    """

    def __init__(self, session: requests.Session) -> None:
        super().__init__(session)
        self.sent_secrets: set[str] = set()

    @sensitive_variables()
    def __call__(  # type: ignore[override]
        self, url: str, method: str = "GET", body: Any = None, headers: Any = None, **kwargs: Any
    ) -> Any:
        self.sent_secrets |= form_secrets(body)
        kwargs["timeout"] = conf.HTTP_TIMEOUT
        response = super().__call__(  # type: ignore[no-untyped-call]
            url, method=method, body=body, headers=headers, **kwargs
        )
        if response.status in _RETRYABLE_STATUS:
            raise TokenEndpointError(
                f"the token endpoint {url} answered HTTP {response.status}", retryable=True
            )
        # Retryable statuses were raised above; anything else that is not JSON
        # is a wrong URL, not an outage.
        json_object(url, response.status, response.data, retryable=False)
        return response


class GoogleProvider(Provider):
    id = "google"
    name = "Google"
    default_smtp = SMTPEndpoint(host="smtp.gmail.com", port=465, security="tls")
    default_scopes = (MAIL_SCOPE,)
    # CLIENT_ID + CLIENT_SECRET or a service account: either suffices, so nothing is
    # required on its own; the checks need an either-or rule (see refresh_access_token).
    # Either an OAuth client or a service account: see settings_problems().
    required_settings: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[tuple[str, str]]:
        problems = []
        has_client = settings.get("CLIENT_ID") and settings.get("CLIENT_SECRET")
        key_file, key_info = (
            settings.get("SERVICE_ACCOUNT_FILE"),
            settings.get("SERVICE_ACCOUNT_INFO"),
        )
        if not (has_client or key_file or key_info):
            problems.append(
                (
                    "needs CLIENT_ID and CLIENT_SECRET (an OAuth client) or a service account "
                    "(SERVICE_ACCOUNT_FILE or SERVICE_ACCOUNT_INFO).",
                    "See the Google page of the documentation.",
                )
            )
        if key_file and not (isinstance(key_file, str) and os.path.isfile(key_file)):
            problems.append((f"SERVICE_ACCOUNT_FILE {key_file!r} is not a readable file.", ""))
        if key_info and not _is_json_object(key_info):
            problems.append(
                (
                    "SERVICE_ACCOUNT_INFO must be the service account's key: a dict, or its "
                    "JSON text.",
                    "",
                )
            )
        return problems

    def _setting(self, key: str) -> str:
        return str(self.settings.get(key) or DEFAULTS.get(key, ""))

    def _client_setting(self, key: str) -> str:
        value = self._setting(key)
        if not value:
            raise ConfigurationError(
                f"XOAUTH2_MAIL['PROVIDERS']['google'] has no {key}: set CLIENT_ID and "
                "CLIENT_SECRET from your OAuth client (Google Cloud console > APIs & Services "
                "> Credentials) to connect mailboxes through consent."
            )
        return value

    # Refresh ---------------------------------------------------------------

    @property
    def consent_free(self) -> bool:
        return bool(
            self.settings.get("SERVICE_ACCOUNT_INFO") or self.settings.get("SERVICE_ACCOUNT_FILE")
        )

    def refresh_access_token(self, email: str, refresh_token: str | None) -> TokenResult:
        delegated = not refresh_token
        credentials: Any
        if refresh_token:
            credentials = google.oauth2.credentials.Credentials(  # type: ignore[no-untyped-call]
                token=None,
                refresh_token=refresh_token,
                token_uri=self._setting("TOKEN_URL"),
                client_id=self._client_setting("CLIENT_ID"),
                client_secret=self._client_setting("CLIENT_SECRET"),
                scopes=list(self.scopes),
            )
        else:
            credentials = self._delegated_credentials(email)
        with (
            requests.Session() as session,
            credentials_kept_out_of_debug_logs(GOOGLE_CREDENTIAL_LOGGERS),
        ):
            request = _TokenEndpointRequest(session)
            try:
                credentials.refresh(request)
            except google_errors.RefreshError as exc:
                secrets = {*request.sent_secrets, refresh_token, self._setting("CLIENT_SECRET")}
                raise _refresh_error(exc, email if delegated else None, secrets) from None
            except google_errors.TransportError as exc:
                cause = exc.__cause__
                reason = (
                    f"did not answer within {conf.HTTP_TIMEOUT:g} s"
                    if isinstance(cause, requests.Timeout)
                    else f"could not be reached ({type(cause or exc).__name__})"
                )
                raise TokenEndpointError(
                    f"Google's token endpoint {reason}", retryable=True
                ) from None
        rotated = credentials.refresh_token if not delegated else None
        return TokenResult(
            access_token=credentials.token,
            expires_at=_aware(credentials.expiry),
            refresh_token=rotated if rotated and rotated != refresh_token else None,
            scopes=tuple(getattr(credentials, "granted_scopes", None) or self.scopes),
        )

    def _delegated_credentials(self, email: str) -> Any:
        info = self._service_account_info()
        if info is None:
            raise ConfigurationError(
                f"The Google mailbox {email} has no refresh token and no service account is "
                f"configured. Connect it with `python manage.py connect_mailbox google --email "
                f"{email}`, or set SERVICE_ACCOUNT_FILE or SERVICE_ACCOUNT_INFO in "
                "XOAUTH2_MAIL['PROVIDERS']['google'] to send through domain-wide delegation."
            )
        if "TOKEN_URL" in self.settings:
            info["token_uri"] = self._setting("TOKEN_URL")
        try:
            service_account = google.oauth2.service_account.Credentials
            return service_account.from_service_account_info(  # type: ignore[no-untyped-call]
                info, scopes=list(self.scopes), subject=email
            )
        except ValueError as exc:  # missing fields, unreadable private key
            raise ConfigurationError(
                f"The Google service account key is not usable ({exc}). Download a new JSON "
                "key from Google Cloud console > IAM & Admin > Service accounts > Keys."
            ) from None

    def _service_account_info(self) -> dict[str, Any] | None:
        raw, source = self.settings.get("SERVICE_ACCOUNT_INFO"), "SERVICE_ACCOUNT_INFO"
        if not raw and self.settings.get("SERVICE_ACCOUNT_FILE"):
            source = "SERVICE_ACCOUNT_FILE"
            try:
                with open(self.settings["SERVICE_ACCOUNT_FILE"], encoding="utf-8") as stream:
                    raw = stream.read()
            except OSError as exc:
                raise ConfigurationError(
                    f"Cannot read the Google service account key file "
                    f"{self.settings['SERVICE_ACCOUNT_FILE']!r} ({exc.strerror}). Fix "
                    "XOAUTH2_MAIL['PROVIDERS']['google']['SERVICE_ACCOUNT_FILE']."
                ) from None
        if not raw:
            return None
        if isinstance(raw, str | bytes):
            try:
                raw = json.loads(raw)
            except ValueError:
                raw = None
        if not isinstance(raw, Mapping):
            raise ConfigurationError(
                f"XOAUTH2_MAIL['PROVIDERS']['google']['{source}'] is not a service account "
                "key: give the JSON key file Google Cloud console created (as a dict, a JSON "
                "string or, for SERVICE_ACCOUNT_FILE, its path)."
            )
        return dict(raw)

    # Consent (authorization code + PKCE) -------------------------------------
    #
    # google_auth_oauthlib's Flow would do these two requests through oauthlib, which
    # refuses any http:// authorization or token URL unless the process-wide
    # OAUTHLIB_INSECURE_TRANSPORT variable is set, and raises a Warning exception when
    # Google grants more scopes than were asked (include_granted_scopes does exactly that)
    # unless OAUTHLIB_RELAX_TOKEN_SCOPE is set. A library must not flip process-wide
    # switches, so the two steps are plain OAuth2 requests with our own state and PKCE.

    @property
    def consent_scopes(self) -> tuple[str, ...]:
        # openid + email: the ID token then names the account that consented.
        return tuple(dict.fromkeys((*self.scopes, "openid", "email")))

    def authorization_url(
        self, *, redirect_uri: str, state: str, code_challenge: str, login_hint: str | None = None
    ) -> str:
        return authorization_request_url(
            self._setting("AUTHORIZATION_URL"),
            client_id=self._client_setting("CLIENT_ID"),
            redirect_uri=redirect_uri,
            scopes=self.consent_scopes,
            state=state,
            code_challenge=code_challenge,
            login_hint=login_hint,
            # offline + consent: Google returns a refresh token every time, even to a
            # user who consented before (it omits it otherwise).
            access_type="offline",
            prompt="consent",
            include_granted_scopes="true",
        )

    @property
    def issuer(self) -> str | None:
        # Google's own consent page answers with iss=https://accounts.google.com; a
        # stand-in configured by AUTHORIZATION_URL is some other server.
        if self._setting("AUTHORIZATION_URL") == DEFAULTS["AUTHORIZATION_URL"]:
            return GOOGLE_ISSUER
        return None

    @sensitive_variables()
    def exchange_code(self, *, code: str, redirect_uri: str, code_verifier: str) -> ConsentResult:
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
            "client_id": self._client_setting("CLIENT_ID"),
            "client_secret": self._client_setting("CLIENT_SECRET"),
        }
        payload = post_token_request(self._setting("TOKEN_URL"), data)
        scopes = tuple(str(payload.get("scope", "")).split())
        if scopes and MAIL_SCOPE not in scopes:
            # Google's consent screen lets the user untick each permission.
            raise TokenEndpointError(
                "The Gmail permission (Read, compose, send and permanently delete all your "
                "email) was not granted. Connect the mailbox again and tick that box on "
                "Google's consent screen.",
                retryable=False,
            )
        email = id_token_claims(payload.get("id_token")).get("email")
        return ConsentResult(
            email=email if isinstance(email, str) else None,
            access_token=payload["access_token"],
            expires_at=expiry_from(payload.get("expires_in")),
            refresh_token=payload.get("refresh_token") or None,
            scopes=scopes,
        )

    def revoke_token(self, token: str) -> bool:
        try:
            response = requests.post(
                self._setting("REVOCATION_URL"), data={"token": token}, timeout=conf.HTTP_TIMEOUT
            )
        except requests.RequestException:
            return False
        return response.ok


@sensitive_variables()
def _refresh_error(
    exc: google_errors.RefreshError, delegated_email: str | None, secrets: Iterable[str | None]
) -> Exception:
    """GrantRevoked or TokenEndpointError for a RefreshError (args: detail, response),
    with the secrets the request carried scrubbed from google-auth's text."""
    response = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
    error = str(response.get("error", ""))
    detail = scrub(str(exc.args[0]) if exc.args else error, secrets)
    if error == "invalid_grant" and delegated_email is None:
        return GrantRevoked(detail)
    if delegated_email is not None:
        # Nobody can consent again for a service account: it is a configuration problem.
        hint = _DELEGATION_HINT.format(email=delegated_email)
        message = f"Google refused the service account's token for {delegated_email} ({detail})"
    else:
        hint = _HINTS.get(error, "")
        message = f"Google refused the refresh ({detail})"
    return TokenEndpointError(f"{message}; {hint}" if hint else message, retryable=exc.retryable)


def _aware(expiry: dt.datetime | None) -> dt.datetime:
    if expiry is None:  # google-auth found no expires_in
        return expiry_from(None)
    # google-auth keeps naive UTC datetimes.
    return expiry.replace(tzinfo=dt.UTC) if expiry.tzinfo is None else expiry


def _is_json_object(value: Any) -> bool:
    if isinstance(value, Mapping):
        return True
    try:
        return isinstance(value, str) and isinstance(json.loads(value), dict)
    except ValueError:
        return False
