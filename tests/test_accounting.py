"""The count, SendError.sent and post_send tell exactly what the server accepted, whatever
fails on the way: a grant revoked mid-batch, a raising pre_send receiver, an address only
the SMTP layer refuses, a sender with no mailbox."""

from __future__ import annotations

import datetime as dt
import logging

import django
import pytest
from django.core import mail
from django.core.mail import EmailMessage
from django.utils import timezone

from django_xoauth2_mail.backends import EmailBackend
from django_xoauth2_mail.devserver.smtp import DROP
from django_xoauth2_mail.exceptions import InvalidMessage, MailboxNotFound, SendError
from django_xoauth2_mail.signals import pre_send
from django_xoauth2_mail.testing import XOAuth2SMTPServer
from tests.conftest import OUR_BACKEND, SENDER

pytestmark = pytest.mark.django_db(transaction=True)


def batch(count: int, sender: str = SENDER) -> list[EmailMessage]:
    return [EmailMessage(f"M{n}", "Body", sender, ["to@example.org"]) for n in range(count)]


@pytest.fixture
def revoked_after_three(settings, mailbox, oauth2_server):
    """A server that accepts three messages, drops the connection, and meanwhile the
    grant is revoked: the reconnect's token is refused and the refresh gets invalid_grant."""

    issued = oauth2_server.issue_tokens(SENDER)  # a cached token: no refresh before sending
    mailbox.refresh_token, mailbox.access_token = issued["refresh_token"], issued["access_token"]
    mailbox.access_token_expires_at = timezone.now() + dt.timedelta(hours=1)
    mailbox.save()

    def revoke_on_third(message):
        if len(server.messages) == 3:
            oauth2_server.revoke(issued["refresh_token"])  # and the grant's access tokens

    server = XOAuth2SMTPServer(oauth2_server.validate_access_token, on_message=revoke_on_third)
    with server:
        settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SMTP_PORT"] = server.port
        server.scripted_replies["AFTER_MESSAGE"] = ["250 ok", "250 ok", DROP]
        yield server


@pytest.mark.parametrize("fail_silently", [False, True])
def test_grant_revoked_mid_batch_counts_what_went_out(
    fail_silently, revoked_after_three, mailbox, post_sends
):
    backend = EmailBackend(fail_silently=fail_silently)
    if fail_silently:
        assert backend.send_messages(batch(5)) == 3
    else:
        with pytest.raises(SendError) as caught:
            backend.send_messages(batch(5))
        assert caught.value.sent == 3
        assert [f.index for f in caught.value.failures] == [3, 4]
        assert "must be reconnected" in str(caught.value)

    assert len(revoked_after_three.messages) == 3
    assert [s["sent"] for s in post_sends] == [True, True, True, False, False]
    assert all("must be reconnected" in s["error"] for s in post_sends[3:])
    mailbox.refresh_from_db()
    assert mailbox.status == "reconnect_required"


def test_raising_pre_send_receiver_fails_that_message_only(
    mailbox, xoauth2_smtp_server, post_sends
):
    def refuse_m1(sender, message, **kwargs):
        if message.subject == "M1":
            raise RuntimeError("not this one")

    pre_send.connect(refuse_m1)
    try:
        with pytest.raises(SendError) as caught:
            EmailBackend().send_messages(batch(3))
    finally:
        pre_send.disconnect(refuse_m1)

    assert [m.data.count(b"Subject: M") for m in xoauth2_smtp_server.messages] == [1, 1]
    assert caught.value.sent == 2
    (failure,) = caught.value.failures
    assert failure.index == 1 and "not this one" in failure.error
    assert [s["sent"] for s in post_sends] == [True, False, True]


@pytest.mark.parametrize("address", ["to\u2028@example.org", "to@example.org>"])
def test_address_the_smtp_layer_refuses_stops_the_call_before_sending(
    address, mailbox, xoauth2_smtp_server
):
    messages = batch(2)
    messages.append(EmailMessage("Bad", "Body", SENDER, [address]))

    with pytest.raises(InvalidMessage, match="Message #2"):
        EmailBackend(fail_silently=True).send_messages(messages)
    assert xoauth2_smtp_server.messages == []


def test_sender_without_mailbox_fails_that_message_only(mailbox, xoauth2_smtp_server, post_sends):
    messages = [*batch(1), *batch(1, sender="nobody@example.com"), *batch(1)]

    with pytest.raises(SendError) as caught:
        EmailBackend().send_messages(messages)

    assert len(xoauth2_smtp_server.messages) == 2
    assert caught.value.sent == 2
    (failure,) = caught.value.failures
    assert failure.index == 1 and "No mailbox can send" in failure.error
    assert [s["sent"] for s in post_sends] == [False, True, True]  # the unsendable one first
    assert post_sends[0]["mailbox"] is None


def test_sender_without_mailbox_honours_fail_silently_and_logs(
    mailbox, xoauth2_smtp_server, caplog
):
    with caplog.at_level(logging.ERROR, logger="django_xoauth2_mail"):
        sent = mail.send_mail("Hi", "Body", "root@localhost", ["a@example.org"], fail_silently=True)

    assert sent == 0
    assert any("root@localhost" in r.getMessage() for r in caplog.records)
    with pytest.raises(MailboxNotFound):
        mail.send_mail("Hi", "Body", "root@localhost", ["a@example.org"])


def test_admin_error_report_from_an_unknown_server_email_does_not_break_the_500(
    settings, mailbox, xoauth2_smtp_server, client
):
    """AdminEmailHandler sends with fail_silently=True from SERVER_EMAIL (Django's default
    root@localhost): the view's 500 must stay a normal 500 page, not an escaped error.

    Django 6.1 with MAILERS no longer passes fail_silently there (any backend's error
    would escape): the mailer's OPTIONS give it, as docs/backend.rst says."""
    if django.VERSION >= (6, 1):
        settings.MAILERS = {"default": {"BACKEND": OUR_BACKEND, "OPTIONS": {"fail_silently": True}}}
    settings.ADMINS = [("Admin", "admin@example.org")]
    settings.SERVER_EMAIL = "root@localhost"
    client.raise_request_exception = False

    response = client.get("/boom/")

    assert response.status_code == 500
    assert xoauth2_smtp_server.messages == []


def test_admin_error_report_is_mailed_from_a_connected_server_email(
    settings, mailbox, xoauth2_smtp_server, client
):
    settings.ADMINS = [("Admin", "admin@example.org")]
    settings.SERVER_EMAIL = SENDER
    client.raise_request_exception = False

    assert client.get("/boom/").status_code == 500

    (report,) = xoauth2_smtp_server.messages
    assert report.rcpt_tos == ["admin@example.org"]
