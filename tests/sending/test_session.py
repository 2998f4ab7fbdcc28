"""The SMTP session: TLS modes, certificates, and what an auth refusal says."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from django.core import mail

from django_xoauth2_mail.exceptions import SMTPAuthenticationFailed, SMTPConnectionFailed
from django_xoauth2_mail.testing import XOAuth2SMTPServer
from tests.conftest import SENDER

pytestmark = pytest.mark.django_db(transaction=True)


def point_at(settings, server, **extra):
    provider = settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]
    provider.update({"SMTP_PORT": server.port, **extra})


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_tls_modes_with_a_private_ca(security, settings, mailbox, oauth2_server, tls_certificate):
    certfile, keyfile = tls_certificate
    with XOAuth2SMTPServer(
        oauth2_server.validate_access_token, security=security, certfile=certfile, keyfile=keyfile
    ) as server:
        point_at(settings, server, SMTP_SECURITY=security, SMTP_CA_FILE=certfile)
        assert mail.send_mail("Hi", "Body", SENDER, ["to@example.org"]) == 1

    assert server.messages[0].auth_user == SENDER


@pytest.mark.parametrize("security", ["tls", "starttls"])
def test_untrusted_certificate_fails_clearly(security, settings, mailbox, oauth2_server):
    with XOAuth2SMTPServer(oauth2_server.validate_access_token, security=security) as server:
        point_at(settings, server, SMTP_SECURITY=security)
        with pytest.raises(SMTPConnectionFailed) as caught:
            mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    assert "SMTP_CA_FILE" in str(caught.value)
    assert server.messages == [] and server.auth_attempts == []


def test_starttls_required_but_not_offered_never_falls_back(settings, mailbox, oauth2_server):
    with XOAuth2SMTPServer(oauth2_server.validate_access_token, security="none") as server:
        point_at(settings, server, SMTP_SECURITY="starttls")
        with pytest.raises(SMTPConnectionFailed, match="STARTTLS|starttls"):
            mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])
    assert server.auth_attempts == []  # the token never crossed in clear


def test_security_none_refuses_a_remote_host(settings, mailbox, xoauth2_smtp_server):
    settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SMTP_HOST"] = "smtp.example.com"
    with pytest.raises(SMTPConnectionFailed, match="ALLOW_INSECURE_SMTP"):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])


def test_temporary_auth_failure_is_not_a_revoked_consent(settings, mailbox, oauth2_server):
    settings.XOAUTH2_MAIL["SMTP_RETRY_DELAYS"] = [0.01]
    with XOAuth2SMTPServer(
        oauth2_server.validate_access_token, temporary_auth_failure=True
    ) as server:
        point_at(settings, server)
        with pytest.raises(SMTPAuthenticationFailed) as caught:
            mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    assert caught.value.smtp_code == 454
    assert "temporary" in str(caught.value).lower()
    # Retried once (one SMTP_RETRY_DELAYS entry), never answered with a token refresh.
    assert [a.temporary_failure for a in server.auth_attempts] == [True, True]
    assert oauth2_server.token_request_count == 1
    mailbox.refresh_from_db()
    assert mailbox.status == "connected"


def test_refusal_reports_the_decoded_challenge_and_a_hint(settings, mailbox, oauth2_server):
    with XOAuth2SMTPServer(lambda user, token: False) as server:
        point_at(settings, server)
        with pytest.raises(SMTPAuthenticationFailed) as caught:
            mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    message = str(caught.value)
    assert "token status" in message  # from the base64 JSON challenge
    assert "https://mail.google.com/" in message
    assert "5.7.8" in message
    for attempt in server.auth_attempts:
        assert "Bearer" not in repr(attempt)


def test_unreachable_server_is_a_connection_error(settings, mailbox):
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SMTP_PORT"] = port
    with pytest.raises(SMTPConnectionFailed, match=f"127.0.0.1:{port}"):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])


def test_refused_recipients_are_reported_and_the_rest_delivered(mailbox, xoauth2_smtp_server):
    from django_xoauth2_mail.exceptions import SendError

    xoauth2_smtp_server.reject_recipients["gone@example.org"] = "550 5.1.1 No such user"
    with pytest.raises(SendError) as caught:
        mail.send_mail("Hi", "Body", SENDER, ["ok@example.org", "gone@example.org"])

    assert xoauth2_smtp_server.messages[0].rcpt_tos == ["ok@example.org"]
    assert caught.value.sent == 1
    (failure,) = caught.value.failures
    assert failure.refused_recipients == {"gone@example.org": (550, "5.1.1 No such user")}
    assert "gone@example.org" in str(caught.value)


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    listener.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(timeout=2)
    for sock in accepted:
        sock.close()
    listener.close()


@pytest.mark.parametrize("security", ["none", "tls", "starttls"])
def test_a_silent_server_times_out_clearly(security, settings, mailbox, silent_server):
    settings.XOAUTH2_MAIL["SMTP_TIMEOUT"] = 0.5
    settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"].update(
        {"SMTP_PORT": silent_server, "SMTP_SECURITY": security}
    )
    started = time.monotonic()
    with pytest.raises(SMTPConnectionFailed, match=f"127.0.0.1:{silent_server}"):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])
    assert time.monotonic() - started < 5  # the TLS handshake / greeting wait is bounded


def test_a_host_that_does_not_resolve_is_a_connection_error(settings, mailbox):
    settings.XOAUTH2_MAIL["SMTP_TIMEOUT"] = 1
    settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"].update(
        {"SMTP_HOST": "smtp.does-not-exist.invalid", "SMTP_SECURITY": "tls"}
    )
    started = time.monotonic()
    with pytest.raises(SMTPConnectionFailed, match="smtp.does-not-exist.invalid"):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])
    assert time.monotonic() - started < 10


def test_a_large_message_goes_out_in_pieces_intact(
    settings, mailbox, oauth2_server, tls_certificate
):
    from django.core.mail import EmailMessage

    certfile, keyfile = tls_certificate
    payload = bytes(range(256)) * 8192  # 2 MB: written in 256 KB pieces
    with XOAuth2SMTPServer(
        oauth2_server.validate_access_token, security="tls", certfile=certfile, keyfile=keyfile
    ) as server:
        point_at(settings, server, SMTP_SECURITY="tls", SMTP_CA_FILE=certfile)
        message = EmailMessage("Big", "Body", SENDER, ["to@example.org"])
        message.attach("big.bin", payload, "application/octet-stream")
        assert message.send() == 1

    import email as email_lib

    parsed = email_lib.message_from_bytes(server.messages[0].data)
    (attachment,) = [p for p in parsed.walk() if p.get_filename() == "big.bin"]
    assert attachment.get_payload(decode=True) == payload


def test_tls_contexts_are_shared_per_ca_file(tls_certificate):
    from django_xoauth2_mail.sending.session import tls_context_for

    certfile, _ = tls_certificate
    assert tls_context_for(certfile) is tls_context_for(certfile)
    assert tls_context_for(None) is tls_context_for(None)
    assert tls_context_for(certfile) is not tls_context_for(None)
