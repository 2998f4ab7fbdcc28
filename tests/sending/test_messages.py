"""What goes on the wire is what Django's own SMTP backend sends."""

from __future__ import annotations

import random
import warnings
from typing import Any

import django
import pytest
from django.core.mail import EmailMessage, EmailMultiAlternatives
from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend

from django_xoauth2_mail.backends import EmailBackend
from django_xoauth2_mail.exceptions import InvalidMessage
from django_xoauth2_mail.sending.messages import build_envelope
from tests.conftest import SENDER, make_mailbox
from tests.sink import PlainSMTPSink

pytestmark = pytest.mark.django_db(transaction=True)

FIXED = {"Date": "Tue, 24 Nov 2026 08:00:00 -0000", "Message-ID": "<fixed@example.com>"}


def plain_text() -> EmailMessage:
    return EmailMessage(
        "Plain", "Hello\nworld\n.\nFrom here", SENDER, ["to@example.org"], headers=FIXED
    )


def everything() -> EmailMessage:
    message = EmailMultiAlternatives(
        subject="Grüße, ça va? 日本語の件名 that is long enough to be folded over two lines",
        body="Body with non-ASCII: żółw 🐢\n" + "long line " * 30,
        from_email=f"Zoë Ünïcode <{SENDER}>",
        to=["Ådne <to@example.org>", "idn@bücher.example"],
        cc=["cc@example.org"],
        bcc=["hidden@example.org"],
        reply_to=["Reply Person <reply@example.org>"],
        headers={**FIXED, "X-Custom": "custom value", "List-Unsubscribe": "<mailto:u@example.com>"},
    )
    message.attach_alternative("<p>Grüße 🐢</p>", "text/html")
    message.attach("report.csv", "a,b\n1,2\n", "text/csv")
    message.attach("blob.bin", bytes(range(256)) * 40, "application/octet-stream")
    message.attach("naïve name.txt", "text attachment", "text/plain")
    return message


def django_wire_bytes(message: EmailMessage) -> tuple[str, list[str], bytes]:
    with PlainSMTPSink() as sink, warnings.catch_warnings():
        # Django 6.1 deprecates building its backend directly; fine in a test.
        warnings.simplefilter("ignore")
        # On Django 6.1 an alias makes it read its OPTIONS, not EMAIL_* settings.
        alias: dict[str, Any] = {"alias": "compare"} if django.VERSION >= (6, 1) else {}
        backend = DjangoSMTPBackend(
            host="127.0.0.1", port=sink.port, username="", password="", **alias
        )
        assert backend.send_messages([message]) == 1
    return sink.messages[0]


@pytest.mark.parametrize("make_message", [plain_text, everything], ids=["plain", "everything"])
def test_bytes_on_the_wire_match_djangos_smtp_backend(
    make_message, real_backend, oauth2_settings, oauth2_server, xoauth2_smtp_server
):
    make_mailbox(oauth2_server)
    # MIME boundaries are drawn from `random`: the same seed gives both the same.
    random.seed(2026)
    expected_from, expected_rcpts, expected_data = django_wire_bytes(make_message())

    random.seed(2026)
    assert EmailBackend().send_messages([make_message()]) == 1

    (received,) = xoauth2_smtp_server.messages
    assert received.mail_from == expected_from
    assert received.rcpt_tos == expected_rcpts
    assert received.data == expected_data


def test_idn_domain_is_punycoded_in_the_envelope():
    envelope = build_envelope(EmailMessage("S", "B", SENDER, ["user@bücher.example"]))
    assert envelope.recipients == ("user@xn--bcher-kva.example",)
    assert not envelope.smtputf8


def test_non_ascii_local_part_needs_smtputf8():
    envelope = build_envelope(EmailMessage("S", "B", SENDER, ["jürgen@example.org"]))
    assert envelope.recipients == ("jürgen@example.org",)
    assert envelope.smtputf8


def test_smtputf8_is_used_when_the_server_offers_it(
    real_backend, oauth2_settings, oauth2_server, xoauth2_smtp_server
):
    make_mailbox(oauth2_server)
    assert EmailMessage("S", "B", SENDER, ["jürgen@example.org"]).send() == 1
    (received,) = xoauth2_smtp_server.messages
    assert received.rcpt_tos == ["jürgen@example.org"]
    assert "SMTPUTF8" in received.mail_options


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subject": "Injected\r\nBcc: victim@example.org"},
        {"to": ["to@example.org\r\nBcc: victim@example.org"]},
        {"from_email": "not an address <<"},
        {"headers": {"X-Evil": "a\r\nBcc: victim@example.org"}},
    ],
    ids=["subject", "recipient", "sender", "custom-header"],
)
def test_header_injection_and_bad_addresses_are_refused_before_sending(
    kwargs, real_backend, oauth2_settings, oauth2_server, xoauth2_smtp_server
):
    make_mailbox(oauth2_server)
    fields = {"subject": "S", "body": "B", "from_email": SENDER, "to": ["to@example.org"]} | kwargs
    good = EmailMessage("Good", "B", SENDER, ["to@example.org"])

    with pytest.raises(InvalidMessage) as caught:
        EmailBackend().send_messages([good, EmailMessage(**fields)])

    assert caught.value.index == 1
    assert "Nothing was sent" in str(caught.value)
    assert xoauth2_smtp_server.messages == []
    assert xoauth2_smtp_server.auth_attempts == []


def test_crlf_in_an_attachment_filename_cannot_inject_headers(
    real_backend, oauth2_settings, oauth2_server, xoauth2_smtp_server
):
    make_mailbox(oauth2_server)
    message = EmailMessage("S", "B", SENDER, ["to@example.org"])
    message.attach("evil\r\nBcc: victim@example.org.txt", b"data", "text/plain")
    try:
        sent = EmailBackend().send_messages([message])
    except InvalidMessage:
        sent = 0  # refused before sending: fine too
    for received in xoauth2_smtp_server.messages[:sent]:
        assert received.rcpt_tos == ["to@example.org"]
        assert b"\r\nBcc:" not in received.data


@pytest.mark.parametrize("to", [["   "], ["a@b@c.example"], ["two@example.org, three@example.org"]])
def test_empty_or_invalid_recipients_are_refused_before_sending(
    to, real_backend, oauth2_settings, oauth2_server, xoauth2_smtp_server
):
    make_mailbox(oauth2_server)
    with pytest.raises(InvalidMessage):
        EmailBackend().send_messages([EmailMessage("S", "B", SENDER, to)])
    assert xoauth2_smtp_server.auth_attempts == []


def test_an_empty_message_is_sent_as_django_would(
    real_backend, oauth2_settings, oauth2_server, xoauth2_smtp_server
):
    make_mailbox(oauth2_server)
    assert EmailBackend().send_messages([EmailMessage("", "", SENDER, ["to@example.org"])]) == 1
    assert len(xoauth2_smtp_server.messages) == 1


def test_a_message_left_without_recipients_is_skipped_with_a_warning(
    real_backend, oauth2_settings, oauth2_server, xoauth2_smtp_server, caplog
):
    # Django drops empty addresses, and its SMTP backend skips a message left
    # without recipients; so does this one, but it says so in the log.
    make_mailbox(oauth2_server)
    assert EmailBackend().send_messages([EmailMessage("S", "B", SENDER, [""])]) == 0
    assert "has no recipients" in caplog.text
    assert xoauth2_smtp_server.auth_attempts == []
