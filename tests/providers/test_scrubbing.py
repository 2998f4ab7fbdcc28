"""A token endpoint (or a proxy in front of it) that echoes the request in its error text
must not put the request's secrets into the exception, the logs, ``Mailbox.last_error`` or
``dumpdata``: for the oauth2/dev path, google-auth (consent and service account) and msal."""

from __future__ import annotations

import io
import json
import logging
import ssl
import traceback
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote_plus, urlencode

import pytest
from django.core import mail
from django.core.management import call_command

from django_xoauth2_mail.exceptions import MailboxReconnectRequired, TokenRefreshError
from django_xoauth2_mail.models import Mailbox
from django_xoauth2_mail.providers import get_provider
from django_xoauth2_mail.providers.base import GrantRevoked, TokenEndpointError
from django_xoauth2_mail.providers.scrub import REDACTED, scrub
from tests.providers.conftest import COMMON_SETTINGS, LocalJSONServer

pytestmark = pytest.mark.django_db(transaction=True)

SENDER = "someone@example.com"
# Characters an echo would form-encode or JSON-escape, so each spelling is exercised.
REFRESH_TOKEN = "1//refresh-token+SECRET=0123456789"
ACCESS_TOKEN = "ya29.access-token-SECRET-0123456789"
CLIENT_SECRET = "client/secret+SECRET=abcdefghij"
CODE = "4/authorization-code+SECRET"
CODE_VERIFIER = "pkce-verifier-SECRET-" + "v" * 30


class ReflectingServer(LocalJSONServer):
    """Refuses every token request with the request itself in ``error_description``
    (decoded, form-encoded and as JSON, on one line), as some proxies and careless
    endpoints do. Serves msal's discovery document too."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(ssl_context)
        self.error = "invalid_grant"
        self.forms: list[dict[str, str]] = []

    def answer(self, method: str, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        tenant, _, rest = path.lstrip("/").partition("/")
        if rest == "v2.0/.well-known/openid-configuration":
            prefix = f"{self.base_url}/{tenant}/oauth2/v2.0"
            return 200, {
                "issuer": f"{self.base_url}/{tenant}/v2.0",
                "authorization_endpoint": f"{prefix}/authorize",
                "token_endpoint": f"{prefix}/token",
            }
        self.forms.append(form)
        echo = f"Bad request {form} body={urlencode(form)} json={json.dumps(form)}"
        return 400, {"error": self.error, "error_description": echo}


@pytest.fixture
def reflecting() -> Iterator[ReflectingServer]:
    with ReflectingServer() as server:
        yield server


@pytest.fixture
def reflecting_https(tls_certificate: tuple[str, str]) -> Iterator[ReflectingServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_certificate)
    with ReflectingServer(context) as server:
        yield server


class EverythingFormatter(logging.Formatter):
    """Formats a record with every attribute it carries (``extra`` included), as JSON
    log formatters do."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{super().format(record)} {vars(record)!r}"


@pytest.fixture
def all_logs() -> Iterator[io.StringIO]:
    """Every log record of every logger, at DEBUG, with its extras."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EverythingFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def assert_nowhere(secrets: list[str], error: BaseException, logs: io.StringIO) -> None:
    dump = io.StringIO()
    call_command("dumpdata", "django_xoauth2_mail", stdout=dump)
    stored = " ".join(mailbox.last_error for mailbox in Mailbox.objects.all())
    places = {
        "the exception": f"{error} {error!r} {''.join(traceback.format_exception(error))}",
        "the logs": logs.getvalue(),
        "Mailbox.last_error": stored,
        "dumpdata": dump.getvalue(),
    }
    for place, text in places.items():
        for secret in secrets:
            for spelling in (secret, quote_plus(secret)):
                assert spelling not in text, f"a secret is in {place}"
    # Not vacuous: the echo did arrive, scrubbed.
    assert REDACTED in str(error)


def send_and_fail(secrets: list[str], logs: io.StringIO) -> BaseException:
    with pytest.raises((MailboxReconnectRequired, TokenRefreshError)) as caught:
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])
    return caught.value


@pytest.fixture
def provider_settings(settings: Any, real_backend: None) -> dict[str, Any]:
    settings.XOAUTH2_MAIL = {"PROVIDERS": {}, **COMMON_SETTINGS}
    return settings.XOAUTH2_MAIL["PROVIDERS"]  # type: ignore[no-any-return]


def mailbox_for(provider: str, refresh_token: str | None = REFRESH_TOKEN) -> Mailbox:
    return Mailbox.objects.create(
        email=SENDER, provider=provider, refresh_token=refresh_token, access_token=ACCESS_TOKEN
    )


@pytest.mark.parametrize("error", ["invalid_grant", "invalid_request"])
def test_oauth2_refresh(error, provider_settings, reflecting, all_logs):
    reflecting.error = error
    provider_settings["oauth2"] = {
        "CLIENT_ID": "client-id",
        "CLIENT_SECRET": CLIENT_SECRET,
        "TOKEN_URL": f"{reflecting.base_url}/token",
        "SMTP_HOST": "127.0.0.1",
    }
    mailbox_for("oauth2")

    failure = send_and_fail([REFRESH_TOKEN, CLIENT_SECRET], all_logs)

    assert reflecting.forms[0]["refresh_token"] == REFRESH_TOKEN  # it was sent, and echoed
    assert_nowhere([REFRESH_TOKEN, CLIENT_SECRET, ACCESS_TOKEN], failure, all_logs)


@pytest.mark.parametrize("error", ["invalid_grant", "invalid_request"])
def test_google_refresh(error, provider_settings, reflecting, all_logs):
    reflecting.error = error
    provider_settings["google"] = {
        "CLIENT_ID": "client-id",
        "CLIENT_SECRET": CLIENT_SECRET,
        "TOKEN_URL": f"{reflecting.base_url}/token",
    }
    mailbox_for("google")

    failure = send_and_fail([REFRESH_TOKEN, CLIENT_SECRET], all_logs)

    assert_nowhere([REFRESH_TOKEN, CLIENT_SECRET, ACCESS_TOKEN], failure, all_logs)


def test_google_service_account_assertion(
    provider_settings, reflecting, service_account_info, all_logs
):
    provider_settings["google"] = {
        "SERVICE_ACCOUNT_INFO": service_account_info,
        "TOKEN_URL": f"{reflecting.base_url}/token",
    }
    mailbox_for("google", refresh_token=None)

    failure = send_and_fail([], all_logs)

    assertion = reflecting.forms[0]["assertion"]
    assert assertion.count(".") == 2  # the signed JWT google-auth sent
    assert_nowhere([assertion, ACCESS_TOKEN], failure, all_logs)


@pytest.mark.parametrize("error", ["invalid_grant", "invalid_request"])
def test_msal_refresh(error, provider_settings, reflecting_https, tls_certificate, all_logs):
    reflecting_https.error = error
    provider_settings["microsoft"] = {
        "CLIENT_ID": "client-id",
        "CLIENT_SECRET": CLIENT_SECRET,
        "AUTHORITY_HOST": reflecting_https.base_url,
        "HTTP_CA_FILE": tls_certificate[0],
    }
    mailbox_for("microsoft")

    failure = send_and_fail([REFRESH_TOKEN, CLIENT_SECRET], all_logs)

    assert any(form.get("refresh_token") == REFRESH_TOKEN for form in reflecting_https.forms)
    assert_nowhere([REFRESH_TOKEN, CLIENT_SECRET, ACCESS_TOKEN], failure, all_logs)


@pytest.mark.parametrize("provider_id", ["oauth2", "google", "microsoft"])
def test_code_exchange(
    provider_id, provider_settings, reflecting, reflecting_https, tls_certificate, all_logs
):
    server = reflecting_https if provider_id == "microsoft" else reflecting
    provider_settings[provider_id] = {
        "CLIENT_ID": "client-id",
        "CLIENT_SECRET": CLIENT_SECRET,
        "TOKEN_URL": f"{server.base_url}/token",
        "AUTHORITY_HOST": server.base_url,
        "HTTP_CA_FILE": tls_certificate[0],
        "SMTP_HOST": "127.0.0.1",
    }
    provider = get_provider(provider_id)

    with pytest.raises((GrantRevoked, TokenEndpointError)) as caught:
        provider.exchange_code(
            code=CODE, redirect_uri="http://127.0.0.1:9/", code_verifier=CODE_VERIFIER
        )

    assert any(form.get("code") == CODE for form in server.forms)
    assert_nowhere([CODE, CODE_VERIFIER, CLIENT_SECRET], caught.value, all_logs)


def test_every_spelling_of_a_secret_is_scrubbed():
    secret = 'a/b+c=d"e-0123'
    text = " ".join(
        [secret, quote_plus(secret), json.dumps(secret), json.dumps(secret).replace("/", "\\/")]
    )
    assert scrub(text, [secret, None, "short"]).count(REDACTED) == 4
    assert scrub("a short one stays", ["short"]) == "a short one stays"


def test_device_flow(reflecting, all_logs):
    import datetime as dt

    from django.utils import timezone

    from django_xoauth2_mail.providers import device_grant
    from django_xoauth2_mail.providers.base import DeviceFlow

    device_code = "device-code-SECRET-0123456789"
    client_auth = {"client_id": "client-id", "client_secret": CLIENT_SECRET}
    with pytest.raises(TokenEndpointError) as started:
        device_grant.start(f"{reflecting.base_url}/devicecode", ["openid"], client_auth)
    flow = DeviceFlow(
        verification_uri="https://example.com/device",
        user_code="ABCD",
        expires_at=timezone.now() + dt.timedelta(minutes=5),
        message="",
        state={"device_code": device_code, "interval": 0},
    )
    with pytest.raises(TokenEndpointError) as polled:
        device_grant.poll(f"{reflecting.base_url}/token", flow, client_auth, timeout=10)

    assert reflecting.forms[-1]["device_code"] == device_code
    assert_nowhere([CLIENT_SECRET], started.value, all_logs)
    assert_nowhere([device_code, CLIENT_SECRET], polled.value, all_logs)
