"""The HTTP side of the development OAuth2 server: routing, parsing and writing responses.

``OAuth2Server`` (oauth.py) implements its endpoints on plain :class:`Request` and
:class:`Response` values, off the HTTP plumbing; this module turns HTTP(S) requests into
them, routes paths (Microsoft's tenant-prefixed ones too) to endpoint names, and writes
the answers back.
"""

from __future__ import annotations

import html
import json
import logging
import re
import socket
import ssl
import sys
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Protocol
from urllib.parse import parse_qs, urlencode, urlsplit

from django_xoauth2_mail.consent.http_server import BackgroundHTTPServer

__all__ = [
    "HTTPServer",
    "OAuth2Error",
    "Request",
    "Response",
    "error_response",
    "json_response",
    "page",
    "redirect",
]

# The server's one logger, named as before oauth.py was split: logging set up for it still
# catches the endpoints' failures.
logger = logging.getLogger(f"{__package__}.oauth")

_TENANT_ROUTE = re.compile(
    r"^/(?P<tenant>[^/]+)/(?:oauth2/v2\.0/(?P<endpoint>authorize|token|devicecode)"
    r"|v2\.0/(?P<discovery>\.well-known/openid-configuration))$"
)
# RFC 8414 section 3.1 puts the issuer's path after this; OpenID Connect appends that.
RFC8414_PREFIX = "/.well-known/oauth-authorization-server"
OIDC_SUFFIX = "/.well-known/openid-configuration"
_ROUTES = {
    "/authorize": "authorize",
    "/token": "token",
    "/devicecode": "devicecode",
    "/device": "device",  # the verification page, where a person enters the user code
    "/revoke": "revoke",
    "/userinfo": "userinfo",
    "/.well-known/openid-configuration": "metadata",
    "/.well-known/oauth-authorization-server": "metadata",
}


class OAuth2Error(Exception):
    """An RFC 6749 error response (section 5.2)."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


@dataclass
class Request:
    method: str
    path: str
    tenant: str | None
    params: dict[str, str]  # query string for GET, form body for POST
    headers: dict[str, str]  # lower-cased names


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, payload: dict[str, Any], **headers: str) -> Response:
    return Response(status, json.dumps(payload).encode(), "application/json", headers)


def error_response(error: OAuth2Error) -> Response:
    headers = {"WWW-Authenticate": 'Basic realm="oauth2"'} if error.status == 401 else {}
    return json_response(
        error.status, {"error": error.error, "error_description": error.description}, **headers
    )


def page(status: int, title: str, body_html: str) -> Response:
    document = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"</head><body><h1>{html.escape(title)}</h1>{body_html}</body></html>"
    )
    return Response(status, document.encode(), "text/html; charset=utf-8")


def redirect(uri: str, **params: str | None) -> Response:
    query = urlencode({name: value for name, value in params.items() if value is not None})
    separator = "&" if urlsplit(uri).query else "?"
    return Response(302, b"", "text/plain", {"Location": f"{uri}{separator}{query}"})


class App(Protocol):
    """What the HTTP server needs of ``OAuth2Server``."""

    verbose: bool

    def _handle(self, endpoint: str, request: Request) -> Response: ...


class HTTPServer(BackgroundHTTPServer):
    def __init__(
        self, address: tuple[str, int], app: App, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.app, self.ssl_context = app, ssl_context
        super().__init__(address, _RequestHandler)

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
    server: HTTPServer
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
        elif url.path.startswith(RFC8414_PREFIX) or url.path.endswith(OIDC_SUFFIX):
            # Metadata of an issuer with a path: which document the app decides.
            endpoint = "metadata"
        if endpoint is None:
            self._send(json_response(404, {"error": "not_found", "error_description": url.path}))
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
            self._send(error_response(error))
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        params = {name: values[0] for name, values in parsed.items()}
        request = Request(self.command, url.path, tenant, params, headers)
        try:
            response = self.server.app._handle(endpoint, request)
        except Exception:
            logger.exception("The OAuth2 development server failed on %s", url.path)
            response = json_response(500, {"error": "server_error"})
        self._send(response)

    def _send(self, response: Response) -> None:
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
