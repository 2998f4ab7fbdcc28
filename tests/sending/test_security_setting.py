"""SMTP_SECURITY fails closed: a value that names no mode never becomes a clear-text login.

The server here offers STARTTLS without requiring it, as many servers do, and accepts
AUTH before it: a client that skipped TLS would hand it the token in clear.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult
from django.core import mail
from django.core.management import CommandError, call_command

from django_xoauth2_mail.devserver.tls import server_ssl_context
from django_xoauth2_mail.exceptions import ConfigurationError
from django_xoauth2_mail.providers import get_provider
from django_xoauth2_mail.providers.base import SMTPEndpoint
from tests.conftest import SENDER

pytestmark = pytest.mark.django_db(transaction=True)


class LaxStartTLSServer:
    """Offers STARTTLS, accepts any XOAUTH2 login with or without it, and records each
    connection and, for each AUTH, whether TLS was on."""

    def __init__(self, certfile: str, keyfile: str) -> None:
        self.tls_context = server_ssl_context(certfile, keyfile)
        self.connections = 0
        self.auth_over_tls: list[bool] = []
        self.messages = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        assert server.session is not None
        self.auth_over_tls.append(server.session.ssl is not None)
        return AuthResult(success=True)

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        self.messages += 1
        return "250 OK"

    def _protocol(self) -> SMTP:
        self.connections += 1
        return SMTP(
            self,
            hostname="localhost",
            tls_context=self.tls_context,
            require_starttls=False,
            auth_require_tls=False,
        )

    def __enter__(self) -> LaxStartTLSServer:
        self.thread.start()
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        started = asyncio.run_coroutine_threadsafe(
            self.loop.create_server(self._protocol, sock=sock), self.loop
        )
        self.server = started.result(timeout=5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture
def lax_server(
    settings: Any, mailbox: Any, tls_certificate: tuple[str, str]
) -> Iterator[LaxStartTLSServer]:
    certfile, keyfile = tls_certificate
    with LaxStartTLSServer(certfile, keyfile) as server:
        settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"].update(
            {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": server.port, "SMTP_CA_FILE": certfile}
        )
        yield server


def use_security(settings: Any, value: Any) -> None:
    settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SMTP_SECURITY"] = value


@pytest.mark.parametrize("value", ["STARTTLS", "starttls ", " StartTLS\n"])
def test_case_and_blanks_do_not_matter(settings, lax_server, value):
    use_security(settings, value)

    assert mail.send_mail("Hi", "Body", SENDER, ["to@example.org"]) == 1

    assert lax_server.auth_over_tls == [True]


@pytest.mark.parametrize("value", ["ssl", "TLS1.2", "start_tls", "", "on", True])
@pytest.mark.parametrize("fail_silently", [False, True])
def test_an_unknown_value_is_refused_before_connecting(settings, lax_server, value, fail_silently):
    use_security(settings, value)

    with pytest.raises(ConfigurationError) as caught:
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"], fail_silently=fail_silently)

    message = str(caught.value)
    assert "XOAUTH2_MAIL['PROVIDERS']['oauth2']['SMTP_SECURITY']" in message
    assert all(mode in message for mode in ("'tls'", "'starttls'", "'none'"))
    assert lax_server.connections == 0 and lax_server.auth_over_tls == []


def test_send_test_email_refuses_it_too(settings, lax_server):
    use_security(settings, "ssl")

    with pytest.raises((CommandError, ConfigurationError), match="SMTP_SECURITY"):
        call_command("send_test_email", SENDER)

    assert lax_server.connections == 0 and lax_server.auth_over_tls == []


def test_the_provider_endpoint_and_a_hand_built_one_fail_closed(settings, oauth2_settings):
    use_security(settings, "ssl")
    with pytest.raises(ConfigurationError, match="SMTP_SECURITY"):
        _ = get_provider("oauth2").smtp_endpoint

    with pytest.raises(ConfigurationError, match="'starttls'"):
        SMTPEndpoint("smtp.example.com", 587, "Start-TLS")  # type: ignore[arg-type]
    assert SMTPEndpoint("smtp.example.com", 587, " TLS ").security == "tls"  # type: ignore[arg-type]
