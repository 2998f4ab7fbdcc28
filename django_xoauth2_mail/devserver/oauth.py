"""A small but real OAuth2 authorization server for local development and tests.

It speaks the parts of RFC 6749 / 7636 (PKCE) / 7009 (revocation) / 8628 (device flow, see
device.py) that the package's providers use, over HTTP or HTTPS on loopback, from a
``ThreadingHTTPServer`` in a daemon thread. Tests drive it like a provider (consent page,
code exchange, device flow, refresh, revocation) and steer it (issue or expire tokens,
approve device codes, inject outages) through Python methods.

:class:`OAuth2Server` is the public face; its parts live beside it: the records and state
file in oauth_store.py, the consent step in oauth_consent.py, the token endpoint's grants
in oauth_grants.py, and the HTTP plumbing in oauth_http.py.
"""

from __future__ import annotations

import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from django_xoauth2_mail.consent.http_server import ServerThread

from .device import DeviceAuthorizations
from .oauth_consent import CODE_LIFETIME, authorize
from .oauth_grants import GRANT_TYPES, RESERVED_SCOPES, TokenGrants, issuer_url, pkce_s256, subject
from .oauth_http import (
    HTTPServer,
    OAuth2Error,
    Request,
    Response,
    error_response,
    json_response,
    page,
)
from .oauth_store import Client, OAuth2Store
from .tls import check_loopback_host, server_ssl_context

# OAuth2Error, pkce_s256 and CODE_LIFETIME were defined here before the split; importing
# them from this module keeps working.
__all__ = ["CODE_LIFETIME", "METADATA_DOCUMENTS", "OAuth2Error", "OAuth2Server", "pkce_s256"]

# The metadata documents it publishes: RFC 8414's and OpenID Connect Discovery's.
METADATA_DOCUMENTS = ("oauth-authorization-server", "openid-configuration")


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
        issuer_path: str = "",
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
        # The issuer is base_url + issuer_path ("/realms/mail", like Keycloak's realms); its
        # metadata is published where RFC 8414 and OpenID Connect Discovery put it.
        if issuer_path and (not issuer_path.startswith("/") or issuer_path.endswith("/")):
            raise ValueError("issuer_path must start with '/' and not end with one")
        self.issuer_path = issuer_path
        # Which metadata documents are published, and per document fields to change
        # (None removes one): tests shape real servers' differences with these.
        self.metadata_documents: set[str] = set(METADATA_DOCUMENTS)
        self.metadata_changes: dict[str, dict[str, Any]] = {}
        self._metadata_requests: list[str] = []
        self.token_response_delay = 0.0  # seconds slept before each /token answer
        # The device flow's polling interval and device code lifetime, in seconds.
        self.device_code_interval, self.device_code_lifetime = 5, 600
        self._device_codes = DeviceAuthorizations()
        self._ssl_context = server_ssl_context(certfile, keyfile) if certfile and keyfile else None
        self._token_requests: list[dict[str, Any]] = []
        self._faults: deque[Response] = deque()
        self._serving: ServerThread | None = None
        self._store = OAuth2Store(Path(state_file) if state_file is not None else None)
        # The records' lock also guards the request log and the queued faults.
        self._lock = self._store.lock
        self._grants = TokenGrants(self, self._store, self._device_codes)

    # Lifecycle and addresses

    def start(self) -> OAuth2Server:
        if self._serving is not None:
            raise RuntimeError("The OAuth2 server is already running.")
        httpd = HTTPServer((self.host.strip("[]"), self._port), self, self._ssl_context)
        self._port = httpd.server_port
        self._serving = ServerThread(httpd, "oauth2-devserver").start()
        return self

    def stop(self) -> None:
        serving, self._serving = self._serving, None
        if serving is not None:
            serving.stop()

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
    def state_file(self) -> Path | None:
        return self._store.state_file

    @state_file.setter
    def state_file(self, path: Path | None) -> None:
        self._store.state_file = path

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        host = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self._port}"

    @property
    def issuer(self) -> str:
        """The issuer identifier its metadata names (RFC 8414)."""
        return self.base_url + self.issuer_path

    def metadata_url(self, document: str = "oauth-authorization-server") -> str:
        """Where a metadata document is published: ``oauth-authorization-server`` (RFC
        8414, the well-known part before the issuer's path) or ``openid-configuration``."""
        if document == "openid-configuration":
            return f"{self.issuer}/.well-known/openid-configuration"
        return f"{self.base_url}/.well-known/oauth-authorization-server{self.issuer_path}"

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
            self._store.clients[client_id] = Client(client_secret, redirect_uris)
            self._store.save()

    def issue_tokens(
        self, email: str, scope: str = "https://mail.google.com/", client_id: str | None = None
    ) -> dict[str, Any]:
        """Issue a refresh and access token for ``email`` without the consent round trip."""
        return self._grants.issue(client_id, email, scope, secrets.token_hex(8), with_refresh=True)

    def approve_device_code(self, user_code: str, email: str) -> bool:
        """Allow a device code as ``email``, as a person on the verification page would."""
        return self._device_codes.decide(user_code, "allow", email)

    def deny_device_code(self, user_code: str) -> bool:
        """Deny a device code; False (for both) when it is unknown, expired or decided."""
        return self._device_codes.decide(user_code, "deny")

    def revoke(self, token: str) -> bool:
        """Revoke a refresh token with every access token of its grant, or one access token."""
        return self._store.revoke(token)

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far expired now."""
        self._store.expire_access_tokens()

    def set_access_token_lifetime(self, seconds: int) -> None:
        """Set ``expires_in`` for access tokens issued from now on."""
        self.access_token_lifetime = seconds

    def validate_access_token(self, email: str, token: str) -> bool:
        """True for a live token issued for ``email``, or for any live application token."""
        return self._store.validate_access_token(email, token)

    def fail_next_token_requests(
        self,
        count: int,
        status: int = 503,
        body: bytes = b"<html><body><h1>503 Service Unavailable</h1></body></html>",
        content_type: str = "text/html",
    ) -> None:
        """Answer the next ``count`` /token calls with this raw response (queued in order)."""
        with self._lock:
            self._faults.extend(Response(status, body, content_type) for _ in range(count))

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

    def _handle(self, endpoint: str, request: Request) -> Response:
        handlers: dict[str, Callable[[Request], Response]] = {
            "authorize": lambda request: authorize(
                request,
                self._store,
                auto_approve=self.auto_approve,
                issuer=issuer_url(self.base_url, request.tenant),
            ),
            "token": self._token_endpoint,
            "devicecode": self._device_authorization_endpoint,
            "device": self._device_verification_page,
            "revoke": self._revocation_endpoint,
            "userinfo": self._userinfo_endpoint,
            "discovery": lambda request: json_response(
                200, self._discovery_document(request.tenant)
            ),
            "metadata": self._metadata_endpoint,
        }
        try:
            return handlers[endpoint](request)
        except OAuth2Error as error:
            return error_response(error)

    def _token_endpoint(self, request: Request) -> Response:
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
        client_id = self._grants.authenticate_client(request)
        body = self._grants.grant(grant_type, client_id, request)
        return json_response(200, body, **{"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _device_authorization_endpoint(self, request: Request) -> Response:
        if request.method != "POST":
            raise OAuth2Error("invalid_request", "The device authorization endpoint accepts POST.")
        if not (request.params.get("client_id") or "authorization" in request.headers):
            raise OAuth2Error("invalid_request", "The client_id parameter is missing.")
        client_id = self._grants.authenticate_client(request)
        body = self._device_codes.start(
            client_id, request.params.get("scope", ""), self.device_verification_url,
            interval=self.device_code_interval, lifetime=self.device_code_lifetime,
        )  # fmt: skip
        return json_response(200, body, **{"Cache-Control": "no-store"})

    def _device_verification_page(self, request: Request) -> Response:
        status, title, body = self._device_codes.page(
            request.method, request.params, request.path, auto_approve=self.auto_approve
        )
        return page(status, title, body)

    def _revocation_endpoint(self, request: Request) -> Response:
        # RFC 7009 section 2.2: 200 whether or not the token was known.
        self.revoke(request.params.get("token", ""))
        return json_response(200, {})

    def _userinfo_endpoint(self, request: Request) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        with self._lock:
            record = self._store.access_tokens.get(token) if scheme.lower() == "bearer" else None
        if record is None or record.expires_at <= time.time():
            challenge = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
            return json_response(401, {"error": "invalid_token"}, **challenge)
        if record.email is None:
            return json_response(200, {"sub": f"client:{record.client_id}"})
        return json_response(200, {"email": record.email, "sub": subject(record.email)})

    @property
    def metadata_requests(self) -> list[str]:
        """The path of every metadata request received, oldest first."""
        with self._lock:
            return list(self._metadata_requests)

    def _metadata_endpoint(self, request: Request) -> Response:
        with self._lock:
            self._metadata_requests.append(request.path)
        for document in sorted(self.metadata_documents):
            if urlsplit(self.metadata_url(document)).path == request.path:
                body = self._discovery_document(None) | {"issuer": self.issuer}
                for name, value in self.metadata_changes.get(document, {}).items():
                    if value is None:
                        body.pop(name, None)
                    else:
                        body[name] = value
                return json_response(200, body)
        return json_response(404, {"error": "not_found", "error_description": request.path})

    def _discovery_document(self, tenant: str | None) -> dict[str, Any]:
        prefix = f"{self.base_url}/{tenant}/oauth2/v2.0" if tenant else self.base_url
        return {
            "issuer": issuer_url(self.base_url, tenant),
            "authorization_endpoint": f"{prefix}/authorize",
            "token_endpoint": f"{prefix}/token",
            "device_authorization_endpoint": f"{prefix}/devicecode",
            "revocation_endpoint": self.revocation_url,
            "userinfo_endpoint": self.userinfo_url,
            "response_types_supported": ["code"],
            "grant_types_supported": list(GRANT_TYPES),
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": True,
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
            "scopes_supported": sorted(RESERVED_SCOPES),
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["none"],
        }
