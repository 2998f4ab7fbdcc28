"""Fixtures for the provider tests: settings pointing google and microsoft at local
servers, a consent driver, and a stand-in for Google's service-account token endpoint."""

from __future__ import annotations

import base64
import html
import json
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from django_xoauth2_mail.models import Mailbox
from django_xoauth2_mail.testing import OAuth2Server, XOAuth2SMTPServer
from django_xoauth2_mail.testing.fixtures import TEST_CLIENT_ID, TEST_CLIENT_SECRET

PUBLIC_CLIENT_ID = "public-client"
SMTP_SEND = "https://outlook.office.com/SMTP.Send"
# What Google's token endpoint expects as the assertion's audience, whatever its URL.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
SERVICE_ACCOUNT_EMAIL = "mailer@test-project.iam.gserviceaccount.com"
WORKSPACE_USERS = {"alice@example.com", "bob@example.com"}

COMMON_SETTINGS = {
    # Tests that exercise retries keep them fast.
    "TOKEN_REFRESH_ATTEMPTS": 2,
    "SMTP_TIMEOUT": 5,
    "HTTP_TIMEOUT": 5,
}


def smtp_settings(server: XOAuth2SMTPServer) -> dict[str, Any]:
    return {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": server.port, "SMTP_SECURITY": "none"}


def make_mailbox(email: str, provider: str, refresh_token: str | None = None) -> Mailbox:
    return Mailbox.objects.create(email=email, provider=provider, refresh_token=refresh_token)


def approve(authorization_url: str, email: str, verify: str | bool = True) -> dict[str, str]:
    """Do what a person does on the dev server's consent page; return the redirect's query."""
    page = requests.get(authorization_url, verify=verify, timeout=5)
    assert page.status_code == 200, page.text
    form = {
        name: html.unescape(value)
        for name, value in re.findall(
            r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page.text
        )
    }
    form.update(email=email, decision="allow")
    action = urlsplit(authorization_url)._replace(query="").geturl()
    answer = requests.post(action, data=form, allow_redirects=False, verify=verify, timeout=5)
    assert answer.status_code == 302, answer.text
    return dict(parse_qsl(urlsplit(answer.headers["Location"]).query))


# Google ----------------------------------------------------------------------


@pytest.fixture
def google_settings(settings: Any, oauth2_server: OAuth2Server, xoauth2_smtp_server: Any) -> Any:
    settings.XOAUTH2_MAIL = {
        "PROVIDERS": {
            "google": {
                "CLIENT_ID": TEST_CLIENT_ID,
                "CLIENT_SECRET": TEST_CLIENT_SECRET,
                "TOKEN_URL": oauth2_server.token_url,
                "AUTHORIZATION_URL": oauth2_server.authorization_url,
                "REVOCATION_URL": oauth2_server.revocation_url,
                **smtp_settings(xoauth2_smtp_server),
            }
        },
        **COMMON_SETTINGS,
    }
    return settings.XOAUTH2_MAIL["PROVIDERS"]["google"]


@pytest.fixture(scope="session")
def service_account_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def service_account_info(
    service_account_key: rsa.RSAPrivateKey, jwt_bearer_server: JWTBearerServer
) -> dict[str, str]:
    """A service account JSON key as Google Cloud console makes it, for the local endpoint."""
    pem = service_account_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "0123456789abcdef",
        "private_key": pem.decode(),
        "client_email": SERVICE_ACCOUNT_EMAIL,
        "client_id": "105000000000000000001",
        "token_uri": jwt_bearer_server.token_url,
    }


class LocalJSONServer:
    """A one-purpose HTTP(S) endpoint on 127.0.0.1: ``answer(method, path, form)`` gives
    the status and JSON body of each request."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        answer = self.answer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.reply(answer("GET", self.path, {}))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.reply(
                    answer("POST", self.path, dict(parse_qsl(self.rfile.read(length).decode())))
                )

            def reply(self, outcome: tuple[int, dict[str, Any]]) -> None:
                data = json.dumps(outcome[1]).encode()
                self.send_response(outcome[0])
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if ssl_context else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def answer(self, method: str, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class JWTBearerServer(LocalJSONServer):
    """Google's token endpoint for service accounts (RFC 7523 jwt-bearer grant), reduced to
    the checks domain-wide delegation makes: the assertion is signed by the service
    account's key, is for the mail scope and is current, and its ``sub`` is a user of the
    domain. It issues access tokens through the OAuth2Server, so the SMTP server accepts
    them for that user only."""

    def __init__(self, public_key: rsa.RSAPublicKey, issue: Callable[[str], str]) -> None:
        super().__init__()
        self.public_key, self.issue = public_key, issue
        self.subjects: list[str] = []  # the sub of each accepted assertion
        self.requests = 0
        self.token_url = f"{self.base_url}/token"

    def answer(self, method: str, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        self.requests += 1
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return 400, {"error": "unsupported_grant_type"}
        try:
            header, claims = self.verified(form.get("assertion", ""))
        except (ValueError, KeyError) as exc:
            return 400, {"error": "invalid_grant", "error_description": f"Invalid JWT: {exc}"}
        now = time.time()
        if not (
            header.get("alg") == "RS256"
            and claims.get("iss") == SERVICE_ACCOUNT_EMAIL
            and claims.get("aud") == GOOGLE_TOKEN_AUDIENCE
            and claims.get("iat", 0) - 60 <= now < claims.get("exp", 0)
        ):
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT claims."}
        if claims.get("scope") != "https://mail.google.com/":
            return 400, {"error": "unauthorized_client", "error_description": "Not authorized."}
        if claims.get("sub") not in WORKSPACE_USERS:
            return 400, {"error": "invalid_grant", "error_description": "Invalid email or User ID"}
        self.subjects.append(claims["sub"])
        return 200, {"access_token": self.issue(claims["sub"]), "expires_in": 3599}

    def verified(self, assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
        parts = assertion.split(".")
        if len(parts) != 3:
            raise ValueError("not a JWS")
        try:
            self.public_key.verify(
                b64decode(parts[2]), f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(),
                hashes.SHA256(),
            )  # fmt: skip
        except InvalidSignature:
            raise ValueError("bad signature") from None
        return json.loads(b64decode(parts[0])), json.loads(b64decode(parts[1]))


def b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@pytest.fixture
def jwt_bearer_server(
    service_account_key: rsa.RSAPrivateKey, oauth2_server: OAuth2Server
) -> Iterator[JWTBearerServer]:
    issue = lambda email: str(oauth2_server.issue_tokens(email)["access_token"])  # noqa: E731
    with JWTBearerServer(service_account_key.public_key(), issue) as server:
        yield server


# Microsoft -------------------------------------------------------------------


@pytest.fixture
def https_oauth2_server(tls_certificate: tuple[str, str]) -> Iterator[OAuth2Server]:
    """An OAuth2Server on HTTPS (msal accepts nothing else) with a confidential and a
    public client."""
    certfile, keyfile = tls_certificate
    with OAuth2Server(certfile=certfile, keyfile=keyfile) as server:
        server.add_client(TEST_CLIENT_ID, TEST_CLIENT_SECRET)
        server.add_client(PUBLIC_CLIENT_ID, None)
        yield server


@pytest.fixture
def microsoft_smtp_server(https_oauth2_server: OAuth2Server) -> Iterator[XOAuth2SMTPServer]:
    with XOAuth2SMTPServer(https_oauth2_server.validate_access_token) as server:
        yield server


@pytest.fixture
def microsoft_settings(
    settings: Any,
    https_oauth2_server: OAuth2Server,
    microsoft_smtp_server: XOAuth2SMTPServer,
    tls_certificate: tuple[str, str],
) -> Any:
    settings.XOAUTH2_MAIL = {
        "PROVIDERS": {
            "microsoft": {
                "CLIENT_ID": TEST_CLIENT_ID,
                "CLIENT_SECRET": TEST_CLIENT_SECRET,
                "AUTHORITY_HOST": https_oauth2_server.base_url,
                "HTTP_CA_FILE": tls_certificate[0],
                **smtp_settings(microsoft_smtp_server),
            }
        },
        **COMMON_SETTINGS,
    }
    return settings.XOAUTH2_MAIL["PROVIDERS"]["microsoft"]


class DeviceFlowServer(LocalJSONServer):
    """Microsoft's device code flow (RFC 8628), which the dev OAuth2Server lacks: discovery,
    the device authorization endpoint, and the device_code grant answering
    ``authorization_pending`` until a test calls :meth:`approve` or :meth:`decline`.
    Approved, it hands out tokens the OAuth2Server issued, so the SMTP server accepts them."""

    DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"

    def __init__(self, ssl_context: ssl.SSLContext, oauth2_server: OAuth2Server) -> None:
        super().__init__(ssl_context)
        self.oauth2_server = oauth2_server
        self.decision: tuple[str, str] | None = None  # ("allow", email) or ("deny", "")
        self.polls = 0
        self.requested_scope = ""

    def approve(self, email: str) -> None:
        self.decision = ("allow", email)

    def decline(self) -> None:
        self.decision = ("deny", "")

    def answer(self, method: str, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        tenant, _, rest = path.lstrip("/").partition("/")
        prefix = f"{self.base_url}/{tenant}/oauth2/v2.0"
        if rest == "v2.0/.well-known/openid-configuration":
            return 200, {
                "issuer": f"{self.base_url}/{tenant}/v2.0",
                "authorization_endpoint": f"{prefix}/authorize",
                "token_endpoint": f"{prefix}/token",
                "device_authorization_endpoint": f"{prefix}/devicecode",
            }
        if rest == "oauth2/v2.0/devicecode" and form.get("client_id") == PUBLIC_CLIENT_ID:
            self.requested_scope = form.get("scope", "")
            return 200, {
                "device_code": "device-code-1",
                "user_code": "ABCD-EFGH",
                "verification_uri": "https://microsoft.com/devicelogin",
                "expires_in": 900,
                "interval": 1,
                "message": "To sign in, open the page and enter ABCD-EFGH.",
            }
        if rest == "oauth2/v2.0/token" and form.get("grant_type") == self.DEVICE_GRANT:
            self.polls += 1
            if form.get("device_code") != "device-code-1":
                return 400, {"error": "bad_verification_code"}
            if self.decision is None:
                return 400, {"error": "authorization_pending", "error_description": "Waiting."}
            if self.decision[0] == "deny":
                return 400, {"error": "authorization_declined", "error_description": "Declined."}
            email = self.decision[1]
            body = self.oauth2_server.issue_tokens(email, scope=f"{SMTP_SEND} offline_access")
            claims = {"preferred_username": email, "aud": PUBLIC_CLIENT_ID, "sub": "s"}
            id_token = ".".join(
                base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()
                for part in ({"alg": "none"}, claims)
            )
            return 200, {**body, "id_token": f"{id_token}."}
        return 404, {"error": "not_found"}


@pytest.fixture
def device_flow_server(
    tls_certificate: tuple[str, str], https_oauth2_server: OAuth2Server
) -> Iterator[DeviceFlowServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_certificate)
    with DeviceFlowServer(context, https_oauth2_server) as server:
        yield server
