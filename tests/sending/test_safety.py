"""The branches that keep a message from being lost or sent twice when the server
misbehaves in ways aiosmtpd does not: each against a bare SMTP server that follows a
script, or the dev server where it can."""

from __future__ import annotations

import pytest
from django.core import mail
from django.core.mail import EmailMessage

from django_xoauth2_mail.backends import EmailBackend
from django_xoauth2_mail.exceptions import MailboxDisconnected, SendError
from django_xoauth2_mail.models import Mailbox
from django_xoauth2_mail.sending.transaction import WRITE_CHUNK
from tests.conftest import SENDER, make_mailbox
from tests.rawsmtp import Conversation, RawSMTPServer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def raw_server(settings, mailbox):
    """Point the oauth2 provider at a RawSMTPServer running ``script``."""

    def start(script):
        server = RawSMTPServer(script).__enter__()
        started.append(server)
        settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SMTP_PORT"] = server.port
        return server

    started: list[RawSMTPServer] = []
    yield start
    for server in started:
        server.__exit__(None, None, None)


def test_connection_cut_while_writing_data_resends_on_a_new_connection(raw_server):
    """The final "." never reached the server, so it cannot have taken the message:
    sending it again is safe, and it is delivered once."""
    delivered: list[bytes] = []

    async def script(talk: Conversation, number: int) -> None:
        await talk.greet_and_log_in()
        await talk.line(), await talk.line(), await talk.line()  # MAIL, RCPT, DATA
        await talk.say("250 2.1.0 OK", "250 2.1.5 OK", "354 Go ahead")
        if number == 1:
            # Some of the data, then cut: closing with unread data sends a reset, which
            # reaches the client while it still writes (the message is far larger than
            # what the socket buffers hold).
            await talk.reader.readexactly(WRITE_CHUNK)
            return
        delivered.append(await talk.read_data())
        await talk.say("250 2.0.0 Queued")
        await talk.line()  # QUIT
        await talk.say("221 Bye")

    server = raw_server(script)
    message = EmailMessage("Big", ("x" * 999 + "\n") * 16_000, SENDER, ["to@example.org"])

    assert EmailBackend().send_messages([message]) == 1
    assert len(server.conversations) == 2
    assert len(delivered) == 1 and b"Subject: Big" in delivered[0]


def test_354_after_every_recipient_was_refused_drops_the_connection(raw_server):
    """Pipelined: the server answered DATA with 354 although no recipient was accepted.
    Ending the data (even empty) could deliver something: the client hangs up instead."""

    async def script(talk: Conversation, number: int) -> None:
        await talk.greet_and_log_in()
        await talk.line(), await talk.line(), await talk.line()  # MAIL, RCPT, DATA
        await talk.say("250 2.1.0 OK", "550 5.1.1 No such user", "354 Go ahead")
        await talk.line()  # whatever comes next: nothing, the client closed

    server = raw_server(script)

    with pytest.raises(SendError, match="refused every recipient"):
        mail.send_mail("Hi", "Body", SENDER, ["nobody@example.org"])

    (talk,) = server.conversations
    after_data = talk.received[talk.received.index(b"DATA\r\n") + 1 :]
    assert after_data in ([], [b""])  # no data, no ".", no RSET: the connection was closed


def test_several_causes_in_one_call_make_one_send_error(
    settings, mailbox, oauth2_server, xoauth2_smtp_server
):
    other = make_mailbox(oauth2_server, "other@example.com")
    Mailbox.objects.filter(pk=other.pk).update(status="disconnected")
    xoauth2_smtp_server.scripted_replies["DATA_END"] = ["550 5.7.1 Rejected"]
    messages = [
        EmailMessage("Refused", "Body", SENDER, ["to@example.org"]),
        EmailMessage("Disconnected", "Body", "other@example.com", ["to@example.org"]),
        EmailMessage("Fine", "Body", SENDER, ["to@example.org"]),
    ]

    with pytest.raises(SendError) as caught:
        EmailBackend().send_messages(messages)

    error = caught.value
    assert str(error).startswith("2 of 3 messages were not (fully) delivered (1 were sent)")
    assert error.sent == 1
    assert [f.index for f in error.failures] == [0, 1]
    assert "550 5.7.1" in error.failures[0].error
    assert "is disconnected" in error.failures[1].error


def test_sending_from_a_disconnected_mailbox_fails_without_a_network_call(
    mailbox, oauth2_server, xoauth2_smtp_server
):
    Mailbox.objects.filter(pk=mailbox.pk).update(status="disconnected")

    with pytest.raises(MailboxDisconnected, match="connect_mailbox"):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    assert oauth2_server.token_request_count == 0
    assert xoauth2_smtp_server.auth_attempts == []
