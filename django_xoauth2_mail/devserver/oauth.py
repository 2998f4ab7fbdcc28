"""A small but real OAuth2 authorization server for local development and tests.

It speaks the parts of RFC 6749 / 7636 (PKCE) / 7009 (revocation) / 8628 (device flow, see
device.py) that the package's providers use, over HTTP or HTTPS on loopback, from a
``ThreadingHTTPServer`` in a daemon thread. Tests drive it like a provider (consent page,
code exchange, device flow, refresh, revocation) and steer it (issue or expire tokens,
approve device codes, inject outages) through Python methods.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import logging
import os
import re
import secrets
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote_plus, urlencode, urlsplit

from .device import GRANT_TYPE as DEVICE_CODE_GRANT
from .device import DeviceAuthorizations, DeviceGrantError
from .tls import check_loopback_host, is_loopback_host, server_ssl_context

__all__ = ["OAuth2Server"]

logger = logging.getLogger(__name__)

CODE_LIFETIME = 600
# Scopes that OpenID Connect clients (msal among them) add on their own; a refresh that
# names them is not asking for more than was granted.
_RESERVED_SCOPES = frozenset({"openid", "email", "profile", "offline_access"})
# RFC 7636 section 4.1: 43 to 128 unreserved characters.
_CODE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_TENANT_ROUTE = re.compile(
    r"^/(?P<tenant>[^/]+)/(?:oauth2/v2\.0/(?P<endpoint>authorize|token|devicecode)"
    r"|v2\.0/(?P<discovery>\.well-known/openid-configuration))$"
)
# The authorization request's parameters, carried through the consent form.
_CONSENT_FIELDS = (
    "response_type", "client_id", "redirect_uri", "scope", "state", "nonce",
    "code_challenge", "code_challenge_method",
)  # fmt: skip
_GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials", DEVICE_CODE_GRANT)
_ROUTES = {
    "/authorize": "authorize",
    "/token": "token",
    "/devicecode": "devicecode",
    "/device": "device",  # the verification page, where a person enters the user code
    "/revoke": "revoke",
    "/userinfo": "userinfo",
    "/.well-known/openid-configuration": "discovery",
    "/.well-known/oauth-authorization-server": "discovery",
}


@dataclass
class _Client:
    secret: str | None  # None: a public client (PKCE only), as msal's PublicClientApplication
    redirect_uris: list[str] | None  # None: any loopback redirect, as Google allows


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    email: str
    scope: str
    code_challenge: str
    nonce: str | None
    expires_at: float


@dataclass
class _RefreshToken:
    client_id: str | None  # None: issued by issue_tokens() for any client
    email: str
    scope: str
    grant_id: str  # shared by every token of one consent, so revocation reaches them all


@dataclass
class _AccessToken:
    client_id: str | None
    email: str | None  # None: a client_credentials (application) token
    scope: str
    expires_at: float
    grant_id: str | None


_TABLES: dict[str, type[Any]] = {
    "clients": _Client,
    "codes": _Code,
    "refresh_tokens": _RefreshToken,
    "access_tokens": _AccessToken,
}


class OAuth2Error(Exception):
    """An RFC 6749 error response (section 5.2)."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


@dataclass
class _Request:
    method: str
    path: str
    tenant: str | None
    params: dict[str, str]  # query string for GET, form body for POST
    headers: dict[str, str]  # lower-cased names


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def _json(status: int, payload: dict[str, Any], **headers: str) -> _Response:
    return _Response(status, json.dumps(payload).encode(), "application/json", headers)


def _error(error: OAuth2Error) -> _Response:
    headers = {"WWW-Authenticate": 'Basic realm="oauth2"'} if error.status == 401 else {}
    return _json(
        error.status, {"error": error.error, "error_description": error.description}, **headers
    )


def _page(status: int, title: str, body_html: str) -> _Response:
    document = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"</head><body><h1>{html.escape(title)}</h1>{body_html}</body></html>"
    )
    return _Response(status, document.encode(), "text/html; charset=utf-8")


def _redirect(uri: str, **params: str | None) -> _Response:
    query = urlencode({name: value for name, value in params.items() if value is not None})
    separator = "&" if urlsplit(uri).query else "?"
    return _Response(302, b"", "text/plain", {"Location": f"{uri}{separator}{query}"})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pkce_s256(verifier: str) -> str:
    """The S256 code challenge for ``verifier`` (RFC 7636 section 4.2)."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def _subject(email: str) -> str:
    # Stable per address, so "sub" survives restarts and token rotation like a real one.
    return hashlib.sha256(email.lower().encode()).hexdigest()[:24]


class OAuth2Server:
    """An OAuth2 authorization server on loopback; see the module docstring.

    ``state_file`` keeps clients and tokens across restarts (in clear: development only).
    ``certfile``/``keyfile`` serve HTTPS, which msal insists on. ``auto_approve`` grants
    consent at once when the request names the account (``login_hint``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        access_token_lifetime: int = 3600,
        rotate_refresh_tokens: bool = True,
        state_file: str | os.PathLike[str] | None = None,
        auto_approve: bool = False,
        allow_non_loopback: bool = False,
        verbose: bool = False,
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        access_token_length: int = 43,
    ) -> None:
        check_loopback_host(host, allow_non_loopback=allow_non_loopback, what="OAuth2 server")
        if (certfile is None) != (keyfile is None):
            raise ValueError("Pass both certfile and keyfile to serve HTTPS, or neither.")
        self.host, self._port = host, port
        self.access_token_lifetime = access_token_lifetime
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.auto_approve, self.verbose = auto_approve, verbose
        # Microsoft's tokens exceed 2 KB; a long token exercises the AUTH line-length path.
        self.access_token_length = access_token_length
        self.token_response_delay = 0.0  # seconds slept before each /token answer
        # The device flow's polling interval and device code lifetime, in seconds.
        self.device_code_interval, self.device_code_lifetime = 5, 600
        self._device_codes = DeviceAuthorizations()
        self.state_file = Path(state_file) if state_file is not None else None
        self._ssl_context = server_ssl_context(certfile, keyfile) if certfile and keyfile else None
        self._lock = threading.RLock()
        self._clients: dict[str, _Client] = {}
        self._codes: dict[str, _Code] = {}
        self._refresh_tokens: dict[str, _RefreshToken] = {}
        self._access_tokens: dict[str, _AccessToken] = {}
        self._token_requests: list[dict[str, Any]] = []
        self._faults: deque[_Response] = deque()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        if self.state_file is not None and self.state_file.exists():
            self._load_state(self.state_file)

    # Lifecycle and addresses

    def start(self) -> OAuth2Server:
        if self._httpd is not None:
            raise RuntimeError("The OAuth2 server is already running.")
        self._httpd = _HTTPServer((self.host.strip("[]"), self._port), self, self._ssl_context)
        self._port = self._httpd.server_port
        # A short poll interval keeps stop() fast.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="oauth2-devserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, thread, self._httpd, self._thread = self._httpd, self._thread, None, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> OAuth2Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self._port}"

    @property
    def authorization_url(self) -> str:
        return f"{self.base_url}/authorize"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def revocation_url(self) -> str:
        return f"{self.base_url}/revoke"

    @property
    def userinfo_url(self) -> str:
        return f"{self.base_url}/userinfo"

    @property
    def device_authorization_url(self) -> str:
        return f"{self.base_url}/devicecode"

    @property
    def device_verification_url(self) -> str:
        return f"{self.base_url}/device"

    def authority_url(self, tenant: str = "common") -> str:
        """An msal-style authority whose discovery document names this server's endpoints."""
        return f"{self.base_url}/{tenant}"

    # Test controls

    def add_client(
        self, client_id: str, client_secret: str | None, redirect_uris: list[str] | None = None
    ) -> None:
        """Register a client; ``client_secret=None`` makes a public (PKCE-only) client."""
        with self._lock:
            self._clients[client_id] = _Client(client_secret, redirect_uris)
            self._save_state()

    def issue_tokens(
        self, email: str, scope: str = "https://mail.google.com/", client_id: str | None = None
    ) -> dict[str, Any]:
        """Issue a refresh and access token for ``email`` without the consent round trip."""
        return self._issue(client_id, email, scope, secrets.token_hex(8), with_refresh=True)

    def approve_device_code(self, user_code: str, email: str) -> bool:
        """Allow a device code as ``email``, as a person on the verification page would."""
        return self._device_codes.decide(user_code, "allow", email)

    def deny_device_code(self, user_code: str) -> bool:
        """Deny a device code; False (for both) when it is unknown, expired or decided."""
        return self._device_codes.decide(user_code, "deny")

    def revoke(self, token: str) -> bool:
        """Revoke a refresh token with every access token of its grant, or one access token."""
        with self._lock:
            refresh = self._refresh_tokens.pop(token, None)
            access = self._access_tokens.pop(token, None)
            if refresh is not None:
                for key, record in list(self._access_tokens.items()):
                    if record.grant_id == refresh.grant_id:
                        del self._access_tokens[key]
            self._save_state()
            return refresh is not None or access is not None

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far expired now."""
        with self._lock:
            past = time.time() - 1
            for record in self._access_tokens.values():
                record.expires_at = min(record.expires_at, past)
            self._save_state()

    def set_access_token_lifetime(self, seconds: int) -> None:
        """Set ``expires_in`` for access tokens issued from now on."""
        self.access_token_lifetime = seconds

    def validate_access_token(self, email: str, token: str) -> bool:
        """True for a live token issued for ``email``, or for any live application token."""
        with self._lock:
            record = self._access_tokens.get(token)
            if record is None or record.expires_at <= time.time():
                return False
            return record.email is None or record.email.lower() == email.lower()

    def fail_next_token_requests(
        self,
        count: int,
        status: int = 503,
        body: bytes = b"<html><body><h1>503 Service Unavailable</h1></body></html>",
        content_type: str = "text/html",
    ) -> None:
        """Answer the next ``count`` /token calls with this raw response (queued in order)."""
        with self._lock:
            self._faults.extend(_Response(status, body, content_type) for _ in range(count))

    @property
    def token_requests(self) -> list[dict[str, Any]]:
        """Every /token call received: ``{"grant_type", "time", "path"}``, oldest first."""
        with self._lock:
            return [dict(entry) for entry in self._token_requests]

    @property
    def token_request_count(self) -> int:
        with self._lock:
            return len(self._token_requests)

    # Endpoints: each takes a parsed request and returns a response, off the HTTP plumbing.

    def _handle(self, endpoint: str, request: _Request) -> _Response:
        handlers: dict[str, Callable[[_Request], _Response]] = {
            "authorize": self._authorize_endpoint,
            "token": self._token_endpoint,
            "devicecode": self._device_authorization_endpoint,
            "device": self._device_verification_page,
            "revoke": self._revocation_endpoint,
            "userinfo": self._userinfo_endpoint,
            "discovery": lambda request: _json(200, self._discovery_document(request.tenant)),
        }
        try:
            return handlers[endpoint](request)
        except OAuth2Error as error:
            return _error(error)

    def _token_endpoint(self, request: _Request) -> _Response:
        if request.method != "POST":
            raise OAuth2Error("invalid_request", "The token endpoint accepts POST only.")
        grant_type = request.params.get("grant_type", "")
        with self._lock:
            entry = {"grant_type": grant_type, "time": time.time(), "path": request.path}
            self._token_requests.append(entry)
            fault = self._faults.popleft() if self._faults else None
        if self.token_response_delay:
            time.sleep(self.token_response_delay)
        if fault is not None:
            return fault
        client_id = self._authenticate_client(request)
        grants: dict[str, Callable[[str, _Request], dict[str, Any]]] = {
            "authorization_code": self._authorization_code_grant,
            "refresh_token": self._refresh_token_grant,
            "client_credentials": self._client_credentials_grant,
            DEVICE_CODE_GRANT: self._device_code_grant,
        }
        if not grant_type:
            raise OAuth2Error("invalid_request", "The grant_type parameter is missing.")
        if grant_type not in grants:
            raise OAuth2Error(
                "unsupported_grant_type", f"Grant type {grant_type!r} is not supported."
            )
        body = grants[grant_type](client_id, request)
        return _json(200, body, **{"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _authenticate_client(self, request: _Request) -> str:
        authorization = request.headers.get("authorization", "")
        if authorization[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(authorization[6:], validate=True).decode()
            except ValueError:  # binascii.Error and UnicodeDecodeError both derive from it
                decoded = ""
            raw_id, _, raw_secret = decoded.partition(":")
            # RFC 6749 section 2.3.1 form-encodes both halves; many clients skip that step.
            candidates = [(unquote_plus(raw_id), unquote_plus(raw_secret)), (raw_id, raw_secret)]
        else:
            params = request.params
            candidates = [(params.get("client_id", ""), params.get("client_secret", ""))]
        with self._lock:
            for client_id, secret in candidates:
                client = self._clients.get(client_id)
                if client is not None and (
                    client.secret is None
                    or hmac.compare_digest(client.secret.encode(), secret.encode())
                ):
                    return client_id
        raise OAuth2Error("invalid_client", "Unknown client or wrong client secret.", 401)

    def _authorization_code_grant(self, client_id: str, request: _Request) -> dict[str, Any]:
        params = request.params
        if not params.get("code"):
            raise OAuth2Error("invalid_request", "The code parameter is missing.")
        with self._lock:
            # Popped before any check: a code is spent by its first use, right or wrong.
            code = self._codes.pop(params["code"], None)
            self._save_state()
        if code is None or code.expires_at <= time.time() or code.client_id != client_id:
            raise OAuth2Error(
                "invalid_grant", "The authorization code is unknown, expired or used."
            )
        if params.get("redirect_uri", "") != code.redirect_uri:
            raise OAuth2Error(
                "invalid_grant", "redirect_uri differs from the authorization request."
            )
        verifier = params.get("code_verifier", "")
        if not _CODE_VERIFIER.fullmatch(verifier) or not hmac.compare_digest(
            pkce_s256(verifier), code.code_challenge
        ):
            raise OAuth2Error("invalid_grant", "PKCE verification failed: wrong code_verifier.")
        body = self._issue(client_id, code.email, code.scope, secrets.token_hex(8), True)
        if {"openid", "email"} & set(code.scope.split()):
            body["id_token"] = self._id_token(code.email, client_id, request.tenant, code.nonce)
        return body

    def _refresh_token_grant(self, client_id: str, request: _Request) -> dict[str, Any]:
        token = request.params.get("refresh_token", "")
        if not token:
            raise OAuth2Error("invalid_request", "The refresh_token parameter is missing.")
        with self._lock:
            record = self._refresh_tokens.get(token)
            if record is None or record.client_id not in (None, client_id):
                raise OAuth2Error(
                    "invalid_grant", "The refresh token is unknown, revoked or already rotated."
                )
            granted = set(record.scope.split())
            asked = set(request.params.get("scope", "").split()) - _RESERVED_SCOPES
            if not asked <= granted:
                raise OAuth2Error(
                    "invalid_scope", f"Not granted: {' '.join(sorted(asked - granted))}"
                )
            if self.rotate_refresh_tokens:
                del self._refresh_tokens[token]
            return self._issue(
                record.client_id, record.email, record.scope, record.grant_id,
                with_refresh=self.rotate_refresh_tokens,
            )  # fmt: skip

    def _client_credentials_grant(self, client_id: str, request: _Request) -> dict[str, Any]:
        if self._clients[client_id].secret is None:
            raise OAuth2Error(
                "unauthorized_client", "A public client cannot use client_credentials."
            )
        return self._issue(client_id, None, request.params.get("scope", ""), None, False)

    def _device_authorization_endpoint(self, request: _Request) -> _Response:
        if request.method != "POST":
            raise OAuth2Error("invalid_request", "The device authorization endpoint accepts POST.")
        if not (request.params.get("client_id") or "authorization" in request.headers):
            raise OAuth2Error("invalid_request", "The client_id parameter is missing.")
        client_id = self._authenticate_client(request)
        body = self._device_codes.start(
            client_id, request.params.get("scope", ""), self.device_verification_url,
            interval=self.device_code_interval, lifetime=self.device_code_lifetime,
        )  # fmt: skip
        return _json(200, body, **{"Cache-Control": "no-store"})

    def _device_code_grant(self, client_id: str, request: _Request) -> dict[str, Any]:
        try:
            grant = self._device_codes.redeem(request.params.get("device_code", ""), client_id)
        except DeviceGrantError as error:
            raise OAuth2Error(error.error, error.description) from None
        body = self._issue(client_id, grant.email, grant.scope, secrets.token_hex(8), True)
        if {"openid", "email"} & set(grant.scope.split()):
            body["id_token"] = self._id_token(grant.email, client_id, request.tenant, None)
        return body

    def _device_verification_page(self, request: _Request) -> _Response:
        status, title, body = self._device_codes.page(
            request.method, request.params, request.path, auto_approve=self.auto_approve
        )
        return _page(status, title, body)

    def _revocation_endpoint(self, request: _Request) -> _Response:
        # RFC 7009 section 2.2: 200 whether or not the token was known.
        self.revoke(request.params.get("token", ""))
        return _json(200, {})

    def _userinfo_endpoint(self, request: _Request) -> _Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        with self._lock:
            record = self._access_tokens.get(token) if scheme.lower() == "bearer" else None
        if record is None or record.expires_at <= time.time():
            challenge = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
            return _json(401, {"error": "invalid_token"}, **challenge)
        if record.email is None:
            return _json(200, {"sub": f"client:{record.client_id}"})
        return _json(200, {"email": record.email, "sub": _subject(record.email)})

    def _discovery_document(self, tenant: str | None) -> dict[str, Any]:
        prefix = f"{self.base_url}/{tenant}/oauth2/v2.0" if tenant else self.base_url
        return {
            "issuer": self._issuer(tenant),
            "authorization_endpoint": f"{prefix}/authorize",
            "token_endpoint": f"{prefix}/token",
            "device_authorization_endpoint": f"{prefix}/devicecode",
            "revocation_endpoint": self.revocation_url,
            "userinfo_endpoint": self.userinfo_url,
            "response_types_supported": ["code"],
            "grant_types_supported": list(_GRANT_TYPES),
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "scopes_supported": sorted(_RESERVED_SCOPES),
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["none"],
        }

    def _issuer(self, tenant: str | None) -> str:
        return f"{self.base_url}/{tenant}/v2.0" if tenant else self.base_url

    # The consent step (RFC 6749 section 4.1.1, with PKCE required)

    def _authorize_endpoint(self, request: _Request) -> _Response:
        params = request.params
        with self._lock:
            client = self._clients.get(params.get("client_id", ""))
        if client is None:
            return _page(
                400, "Unknown client", "<p>No client with this client_id is registered.</p>"
            )
        redirect_uri = params.get("redirect_uri", "")
        if not redirect_uri and client.redirect_uris and len(client.redirect_uris) == 1:
            redirect_uri = client.redirect_uris[0]
        if not _redirect_allowed(client, redirect_uri):
            # Never redirect to an unregistered address (RFC 6749 section 4.1.2.1).
            return _page(400, "Redirect URI not allowed", "<p>Register it with the client.</p>")
        state = params.get("state")
        problem = _authorization_request_problem(params)
        if problem is not None:
            return _redirect(
                redirect_uri, error=problem[0], error_description=problem[1], state=state
            )
        email = params.get("email") or params.get("login_hint", "")
        if request.method == "POST":
            if params.get("decision") != "allow":
                return _redirect(redirect_uri, error="access_denied", state=state)
            if "@" not in email:
                return self._consent_page(request, redirect_uri, "Enter the address to act as.")
        elif not (self.auto_approve and "@" in email):
            return self._consent_page(request, redirect_uri)
        code = secrets.token_urlsafe(32)
        with self._lock:
            self._codes[code] = _Code(
                params["client_id"], redirect_uri, email, params.get("scope", ""),
                params["code_challenge"], params.get("nonce"), time.time() + CODE_LIFETIME,
            )  # fmt: skip
            self._save_state()
        return _redirect(redirect_uri, code=code, state=state)

    def _consent_page(self, request: _Request, redirect_uri: str, problem: str = "") -> _Response:
        params = dict(request.params, redirect_uri=redirect_uri)
        hidden = "".join(
            f'<input type="hidden" name="{name}" value="{html.escape(params[name])}">'
            for name in _CONSENT_FIELDS
            if name in params
        )
        scopes = "".join(f"<li>{html.escape(s)}</li>" for s in params.get("scope", "").split())
        email = html.escape(params.get("email") or params.get("login_hint", ""))
        body = (
            (f"<p class='error'>{html.escape(problem)}</p>" if problem else "")
            + f"<p>Client <code>{html.escape(params['client_id'])}</code> asks for:</p>"
            + f"<ul>{scopes}</ul><form method='post' action='{html.escape(request.path)}'>"
            + f"{hidden}<label>Email address <input type='email' name='email' value='{email}' "
            + "required></label> <button name='decision' value='allow'>Allow</button> "
            + "<button name='decision' value='deny' formnovalidate>Deny</button></form>"
        )
        return _page(400 if problem else 200, "Authorize access", body)

    # Token issuance and persistence

    def _issue(
        self,
        client_id: str | None,
        email: str | None,
        scope: str,
        grant_id: str | None,
        with_refresh: bool,
    ) -> dict[str, Any]:
        lifetime = self.access_token_lifetime
        access = secrets.token_urlsafe(self.access_token_length)[: self.access_token_length]
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scope,
        }
        with self._lock:
            self._access_tokens[access] = _AccessToken(
                client_id, email, scope, time.time() + lifetime, grant_id
            )
            if with_refresh and email is not None and grant_id is not None:
                body["refresh_token"] = secrets.token_urlsafe(32)
                self._refresh_tokens[body["refresh_token"]] = _RefreshToken(
                    client_id, email, scope, grant_id
                )
            self._save_state()
        return body

    def _id_token(self, email: str, client_id: str, tenant: str | None, nonce: str | None) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self._issuer(tenant),
            "sub": _subject(email),
            "aud": client_id,
            "email": email,
            "email_verified": True,
            "preferred_username": email,
            "iat": now,
            "exp": now + self.access_token_lifetime,
        }
        if nonce:
            claims["nonce"] = nonce
        # Unsigned ("alg": "none"): well-formed for parsers, worthless as proof, as intended.
        parts = ({"alg": "none", "typ": "JWT"}, claims)
        return ".".join(_b64url(json.dumps(part).encode()) for part in parts) + "."

    def _tables(self) -> dict[str, dict[str, Any]]:
        return {
            "clients": self._clients,
            "codes": self._codes,
            "refresh_tokens": self._refresh_tokens,
            "access_tokens": self._access_tokens,
        }

    def _save_state(self) -> None:
        if self.state_file is None:
            return
        with self._lock:
            state: dict[str, Any] = {"version": 1}
            for name, table in self._tables().items():
                state[name] = {key: asdict(record) for key, record in table.items()}
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            # Write beside the target and rename: a crash never leaves half a file.
            fd, temporary = tempfile.mkstemp(prefix=".oauth2-state-", dir=self.state_file.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                json.dump(state, stream, indent=1)
            os.replace(temporary, self.state_file)

    def _load_state(self, path: Path) -> None:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            for name, table in self._tables().items():
                records = state[name].items()
                table.update((key, _TABLES[name](**fields)) for key, fields in records)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"Cannot read the OAuth2 development server state file {path}: {error!r}. "
                "Delete it to start with no clients and tokens."
            ) from error


def _redirect_allowed(client: _Client, uri: str) -> bool:
    if client.redirect_uris is not None:
        return uri in client.redirect_uris
    parts = urlsplit(uri)
    return (
        parts.scheme in ("http", "https")
        and is_loopback_host(parts.hostname or "")
        and not parts.fragment
    )


def _authorization_request_problem(params: dict[str, str]) -> tuple[str, str] | None:
    if params.get("response_type") != "code":
        return "unsupported_response_type", "Only response_type=code is supported."
    if not params.get("code_challenge"):
        return "invalid_request", "PKCE is required: send code_challenge with method S256."
    if params.get("code_challenge_method") != "S256":
        return "invalid_request", "code_challenge_method must be S256 (plain is refused)."
    return None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # an in-flight (delayed) response must not hold up stop()

    def __init__(
        self, address: tuple[str, int], app: OAuth2Server, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app, self.ssl_context = app, ssl_context
        super().__init__(address, _RequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS query that can stall start().
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.ssl_context is not None:
            # Handshake later, in the request's thread: a stalled client cannot block accept().
            sock = self.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that drop the connection or reject our certificate are not server bugs.
        if self.app.verbose or not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _RequestHandler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "xoauth2-devserver"
    timeout = 30  # a silent client frees its thread eventually

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        endpoint, tenant = _ROUTES.get(url.path), None
        match = _TENANT_ROUTE.match(url.path)
        if match:
            endpoint, tenant = match["endpoint"] or "discovery", match["tenant"]
        if endpoint is None:
            self._send(_json(404, {"error": "not_found", "error_description": url.path}))
            return
        raw = url.query
        if self.command == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode("utf-8", "replace")
        parsed = parse_qs(raw, keep_blank_values=True)
        repeated = sorted(name for name, values in parsed.items() if len(values) > 1)
        if repeated:
            # RFC 6749 section 3.1: parameters must not repeat.
            error = OAuth2Error("invalid_request", f"Repeated parameter(s): {', '.join(repeated)}")
            self._send(_error(error))
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        params = {name: values[0] for name, values in parsed.items()}
        request = _Request(self.command, url.path, tenant, params, headers)
        try:
            response = self.server.app._handle(endpoint, request)
        except Exception:
            logger.exception("The OAuth2 development server failed on %s", url.path)
            response = _json(500, {"error": "server_error"})
        self._send(response)

    def _send(self, response: _Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.app.verbose:
            super().log_message(format, *args)
