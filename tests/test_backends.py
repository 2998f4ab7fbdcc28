"""The backend end to end: real SMTP server checking XOAUTH2, real token endpoint."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import smtplib
import threading
from typing import Any

import pytest
from django.core import mail
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.utils import timezone

from django_xoauth2_mail.backends import EmailBackend
from django_xoauth2_mail.exceptions import (
    ConfigurationError,
    MailboxNotFound,
    MailboxReconnectRequired,
    SendError,
)
from django_xoauth2_mail.models import Mailbox, MailboxStatus
from tests.conftest import SENDER, make_mailbox

pytestmark = pytest.mark.django_db(transaction=True)


def test_send_mail_delivers_over_xoauth2(mailbox, xoauth2_smtp_server, oauth2_server):
    sent = mail.send_mail("Hello", "Body", SENDER, ["to@example.org"])

    assert sent == 1
    (received,) = xoauth2_smtp_server.messages
    assert received.mail_from == SENDER
    assert received.rcpt_tos == ["to@example.org"]
    assert received.auth_user == SENDER
    parsed = email.message_from_bytes(received.data)
    assert parsed["Subject"] == "Hello"
    assert parsed.get_payload() == "Body\r\n"
    # The mailbox had no access token: exactly one refresh, then saved encrypted.
    assert oauth2_server.token_request_count == 1
    mailbox.refresh_from_db()
    assert mailbox.access_token and mailbox.access_token_expires_at > timezone.now()
    assert mailbox.last_sent_at is not None


def test_cached_token_is_used_without_refresh(mailbox, xoauth2_smtp_server, oauth2_server):
    mail.send_mail("One", "Body", SENDER, ["to@example.org"])
    mail.send_mail("Two", "Body", SENDER, ["to@example.org"])

    assert len(xoauth2_smtp_server.messages) == 2
    assert oauth2_server.token_request_count == 1


def test_expired_token_is_refreshed_once_before_sending(
    mailbox, xoauth2_smtp_server, oauth2_server
):
    mail.send_mail("One", "Body", SENDER, ["to@example.org"])
    Mailbox.objects.filter(pk=mailbox.pk).update(
        # An hour-long token with 30 s left: inside the 300 s skew.
        last_refreshed_at=timezone.now() - dt.timedelta(seconds=3570),
        access_token_expires_at=timezone.now() + dt.timedelta(seconds=30),
    )

    mail.send_mail("Two", "Body", SENDER, ["to@example.org"])

    assert oauth2_server.token_request_count == 2
    assert [a.accepted for a in xoauth2_smtp_server.auth_attempts] == [True, True]


def test_refused_token_is_refreshed_and_send_retried_once(
    mailbox, xoauth2_smtp_server, oauth2_server
):
    # The cached token looks fresh but the server no longer accepts it.
    mailbox.access_token = "revoked-at-the-server"
    mailbox.access_token_expires_at = timezone.now() + dt.timedelta(hours=1)
    mailbox.save()

    assert mail.send_mail("Hi", "Body", SENDER, ["to@example.org"]) == 1

    assert [a.accepted for a in xoauth2_smtp_server.auth_attempts] == [False, True]
    assert oauth2_server.token_request_count == 1
    assert len(xoauth2_smtp_server.messages) == 1


def test_token_refused_twice_raises_clear_error(settings, mailbox, oauth2_server):
    from django_xoauth2_mail.testing import XOAuth2SMTPServer

    with XOAuth2SMTPServer(validate_token=lambda user, token: False) as refusing:
        settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SMTP_PORT"] = refusing.port
        with pytest.raises(SendError) as caught:
            mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    message = str(caught.value)
    assert "535" in message and "5.7.8" in message and SENDER in message
    assert caught.value.smtp_code == 535
    assert caught.value.sent == 0
    assert len(refusing.auth_attempts) == 2  # one retry, not more
    assert oauth2_server.token_request_count == 2  # initial + one forced refresh


def test_long_token_goes_after_334(settings, mailbox, oauth2_server):
    from django_xoauth2_mail.testing import XOAuth2SMTPServer

    long_token = "x" * 2500  # Microsoft-sized
    mailbox.access_token = long_token
    mailbox.access_token_expires_at = timezone.now() + dt.timedelta(hours=1)
    mailbox.save()
    with XOAuth2SMTPServer(
        validate_token=lambda user, token: token == long_token, max_line_length=1000
    ) as server:
        settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SMTP_PORT"] = server.port
        assert mail.send_mail("Hi", "Body", SENDER, ["to@example.org"]) == 1

    (attempt,) = server.auth_attempts
    assert attempt.accepted and not attempt.initial_response_on_auth_line


def test_bcc_goes_in_envelope_not_headers(mailbox, xoauth2_smtp_server):
    message = EmailMessage(
        "Hi", "Body", SENDER, ["to@example.org"], cc=["cc@example.org"], bcc=["bcc@example.org"]
    )
    assert message.send() == 1

    (received,) = xoauth2_smtp_server.messages
    assert sorted(received.rcpt_tos) == ["bcc@example.org", "cc@example.org", "to@example.org"]
    assert b"bcc@example.org" not in received.data


def test_messages_from_several_mailboxes_each_use_their_own(
    mailbox, xoauth2_smtp_server, oauth2_server
):
    make_mailbox(oauth2_server, "other@example.com")
    messages = [
        EmailMessage("A", "Body", SENDER, ["to@example.org"]),
        EmailMessage("B", "Body", "Other <OTHER@example.com>", ["to@example.org"]),
        EmailMessage("C", "Body", SENDER, ["to@example.org"]),
    ]

    assert EmailBackend().send_messages(messages) == 3

    by_subject = {
        email.message_from_bytes(m.data)["Subject"]: m.auth_user
        for m in xoauth2_smtp_server.messages
    }
    assert by_subject == {"A": SENDER, "B": "other@example.com", "C": SENDER}


def test_sender_header_picks_the_mailbox(mailbox, xoauth2_smtp_server):
    message = EmailMessage(
        "Hi",
        "Body",
        "Someone <someone@elsewhere.example>",
        ["to@example.org"],
        headers={"Sender": SENDER},
    )
    assert message.send() == 1
    assert xoauth2_smtp_server.messages[0].auth_user == SENDER


def test_mailbox_option_and_default_mailbox_are_fallbacks(settings, mailbox, xoauth2_smtp_server):
    message = EmailMessage("Hi", "Body", "alias@example.com", ["to@example.org"])
    assert EmailBackend(mailbox=SENDER).send_messages([message]) == 1

    settings.XOAUTH2_MAIL["DEFAULT_MAILBOX"] = SENDER
    assert EmailBackend().send_messages([message]) == 1
    assert [m.auth_user for m in xoauth2_smtp_server.messages] == [SENDER, SENDER]


def test_unknown_sender_raises_mailbox_not_found(mailbox, xoauth2_smtp_server):
    with pytest.raises(MailboxNotFound) as caught:
        mail.send_mail("Hi", "Body", "nobody@example.com", ["to@example.org"])
    assert "nobody@example.com" in str(caught.value)
    assert "connect_mailbox" in str(caught.value)
    assert isinstance(caught.value, smtplib.SMTPSenderRefused)  # what Django's backend raised
    assert xoauth2_smtp_server.messages == []


def test_open_close_reuse_one_connection(mailbox, xoauth2_smtp_server):
    with EmailBackend() as backend:
        for n in range(3):
            backend.send_messages([EmailMessage(f"M{n}", "Body", SENDER, ["to@example.org"])])

    assert len(xoauth2_smtp_server.messages) == 3
    assert len(xoauth2_smtp_server.auth_attempts) == 1


def test_without_open_each_call_uses_its_own_connection(mailbox, xoauth2_smtp_server):
    backend = EmailBackend()
    for n in range(2):
        backend.send_messages([EmailMessage(f"M{n}", "Body", SENDER, ["to@example.org"])])
    assert len(xoauth2_smtp_server.auth_attempts) == 2


def test_sixteen_threads_with_expired_token_cause_one_refresh(
    mailbox, xoauth2_smtp_server, oauth2_server
):
    start = threading.Barrier(16)
    results: list[int] = []
    errors: list[BaseException] = []

    def send(n: int) -> None:
        start.wait()
        try:
            results.append(mail.send_mail(f"T{n}", "Body", SENDER, ["to@example.org"]))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert results == [1] * 16
    assert oauth2_server.token_request_count == 1
    assert len(xoauth2_smtp_server.messages) == 16


def test_send_mail_from_a_thread_running_an_event_loop(mailbox, xoauth2_smtp_server):
    async def async_view() -> int:
        # What an async view calling the sync API does; a bare async_to_sync
        # would raise here.
        return mail.send_mail("From async", "Body", SENDER, ["to@example.org"])

    assert asyncio.run(async_view()) == 1
    assert len(xoauth2_smtp_server.messages) == 1


def test_asend_messages(mailbox, xoauth2_smtp_server):
    async def main() -> int:
        backend = EmailBackend()
        messages = [EmailMessage(f"A{n}", "Body", SENDER, ["to@example.org"]) for n in range(3)]
        return await backend.asend_messages(messages)

    assert asyncio.run(main()) == 3
    assert len(xoauth2_smtp_server.messages) == 3


def test_revoked_consent_flags_mailbox_and_later_sends_fail_fast(
    mailbox, xoauth2_smtp_server, oauth2_server
):
    from django_xoauth2_mail.signals import mailbox_reconnect_required

    received: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        received.append(kwargs)

    mailbox_reconnect_required.connect(receiver)
    try:
        oauth2_server.revoke(mailbox.refresh_token)
        with pytest.raises(MailboxReconnectRequired) as caught:
            mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])
    finally:
        mailbox_reconnect_required.disconnect(receiver)

    assert "connect_mailbox" in str(caught.value) and "admin" in str(caught.value)
    mailbox.refresh_from_db()
    assert mailbox.status == MailboxStatus.RECONNECT_REQUIRED
    assert "invalid_grant" in mailbox.last_error
    assert [r["mailbox"].email for r in received] == [SENDER]

    calls_before = oauth2_server.token_request_count
    with pytest.raises(MailboxReconnectRequired):
        mail.send_mail("Again", "Body", SENDER, ["to@example.org"])
    assert oauth2_server.token_request_count == calls_before  # no network call
    assert xoauth2_smtp_server.messages == []


def test_fail_silently_returns_zero_instead_of_raising(mailbox, oauth2_server):
    oauth2_server.revoke(mailbox.refresh_token)
    assert mail.send_mail("Hi", "Body", SENDER, ["to@example.org"], fail_silently=True) == 0


def test_password_is_refused_with_a_clear_error(mailbox):
    with pytest.raises(ConfigurationError, match="takes no password"):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"], auth_password="secret")


def test_auth_user_names_the_mailbox(mailbox, xoauth2_smtp_server):
    assert mail.send_mail("Hi", "Body", "alias@example.com", ["a@example.org"], auth_user=SENDER)
    assert xoauth2_smtp_server.messages[0].auth_user == SENDER


def test_message_without_recipients_is_skipped_like_django(mailbox, xoauth2_smtp_server):
    assert EmailBackend().send_messages([EmailMessage("Hi", "Body", SENDER, [])]) == 0
    assert xoauth2_smtp_server.auth_attempts == []


def test_alternatives_and_attachments_arrive_intact(mailbox, xoauth2_smtp_server):
    message = EmailMultiAlternatives("Hi", "Plain", SENDER, ["to@example.org"])
    message.attach_alternative("<p>Rich</p>", "text/html")
    message.attach("data.bin", bytes(range(256)), "application/octet-stream")
    assert message.send() == 1

    parsed = email.message_from_bytes(xoauth2_smtp_server.messages[0].data)
    parts = {part.get_content_type(): part for part in parsed.walk()}
    html = parts["text/html"].get_payload(decode=True)
    assert isinstance(html, bytes) and html.rstrip() == b"<p>Rich</p>"
    assert parts["application/octet-stream"].get_payload(decode=True) == bytes(range(256))


def test_close_says_quit_to_held_sessions(mailbox, xoauth2_smtp_server):
    backend = EmailBackend()
    backend.open()
    backend.send_messages([EmailMessage("M", "Body", SENDER, ["to@example.org"])])
    assert backend.dispatcher.holds_sessions

    backend.close()

    assert not backend.dispatcher.holds_sessions
    backend.close()  # twice is fine
