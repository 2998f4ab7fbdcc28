"""The error hierarchy: each error is what Django's SMTP backend raised in its place,
so code written for that backend (django-mailer among it) keeps working."""

from __future__ import annotations

import datetime as dt
import pickle
import smtplib
from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.core import mail
from django.core.management import call_command
from django.utils import timezone

from django_xoauth2_mail.exceptions import (
    MailboxDisconnected,
    MailboxReconnectRequired,
    SendError,
    SMTPAuthenticationFailed,
    SMTPConnectionFailed,
    TokenRefreshError,
    XOAuth2MailError,
)
from tests.conftest import SENDER, make_mailbox

REVOKED = "revoked@example.com"


def test_a_revoked_grant_is_an_smtp_authentication_error():
    error = MailboxReconnectRequired(REVOKED, "invalid_grant: Token has been revoked.")

    assert isinstance(error, XOAuth2MailError)
    assert isinstance(error, smtplib.SMTPAuthenticationError)
    assert str(error).startswith(f"The mailbox {REVOKED} must be reconnected")
    assert "connect_mailbox" in str(error)
    assert error.smtp_code == 535
    assert error.smtp_error == str(error)
    assert error.mailbox == REVOKED and error.detail.startswith("invalid_grant")


@pytest.mark.parametrize(
    "error",
    [
        TokenRefreshError("Could not refresh the access token of a@example.com: down."),
        MailboxDisconnected("a@example.com"),
    ],
    ids=["token-endpoint-outage", "disconnected-mailbox"],
)
def test_an_outage_or_a_disconnected_mailbox_is_a_connection_failure(error):
    assert isinstance(error, XOAuth2MailError)
    assert isinstance(error, smtplib.SMTPServerDisconnected)
    assert isinstance(error, OSError)  # socket.error, which queues defer
    assert "a@example.com" in str(error)
    assert not str(error).startswith("(")  # the message, not an args tuple


def test_send_errors_keep_their_smtp_details():
    refused = SMTPAuthenticationFailed("refused", smtp_code=535, smtp_error="5.7.8 Bad token")
    assert isinstance(refused, smtplib.SMTPAuthenticationError)
    assert (refused.smtp_code, refused.smtp_error, str(refused)) == (
        535,
        "5.7.8 Bad token",
        "refused",
    )
    assert isinstance(SMTPConnectionFailed("down"), smtplib.SMTPException)


@pytest.mark.parametrize(
    "error",
    [
        MailboxReconnectRequired(REVOKED, "invalid_grant"),
        MailboxDisconnected(REVOKED),
        TokenRefreshError("outage", mailbox=REVOKED),
        SendError("2 of 3", mailbox=REVOKED, sent=1, smtp_code=451),
    ],
    ids=lambda error: type(error).__name__,
)
def test_errors_survive_pickling(error):
    copy = pickle.loads(pickle.dumps(error))

    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.__dict__ == error.__dict__


def test_a_grant_revoked_mid_send_stays_a_reconnect_error(mailbox, oauth2_server):
    # The cached token looks fresh, the SMTP server refuses it (535), and the refresh
    # meets invalid_grant: the error raised inside the SMTP login is OSError-derived
    # now, and must not be mistaken for a connection failure on the way out.
    mailbox.access_token = "refused-by-the-server"
    mailbox.access_token_expires_at = timezone.now() + dt.timedelta(hours=1)
    mailbox.save()
    oauth2_server.revoke(mailbox.refresh_token)

    with pytest.raises(MailboxReconnectRequired):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])


# django-mailer: `manage.py send_mail` defers a message whose backend raised what Django's
# SMTP backend raises for a temporary or login problem, and re-raises anything else.


@pytest.fixture
def mailer_app(settings: Any, mailbox: Any) -> Iterator[None]:
    """django-mailer installed for this test only, with its tables."""
    if django.VERSION >= (6, 1):
        # django-mailer reads settings.EMAIL_BACKEND, which Django 6.1 refuses while
        # MAILERS is set: configure it the pre-MAILERS way its users do.
        del settings.MAILERS
        settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.INSTALLED_APPS = [*settings.INSTALLED_APPS, "mailer"]
    settings.MAILER_EMAIL_BACKEND = "django_xoauth2_mail.backends.EmailBackend"
    settings.MAILER_USE_FILE_LOCK = False
    call_command("migrate", "mailer", verbosity=0)
    yield
    call_command("migrate", "mailer", "zero", verbosity=0)


def test_django_mailer_defers_a_revoked_mailbox_and_sends_the_healthy_one(
    mailer_app, oauth2_server, xoauth2_smtp_server
):
    import mailer
    from mailer.models import RESULT_FAILURE, Message, MessageLog

    revoked = make_mailbox(oauth2_server, REVOKED)
    oauth2_server.revoke(revoked.refresh_token)
    # Queued first, so a crash on it would keep the healthy mailbox's mail queued.
    mailer.send_mail("From the revoked mailbox", "Body", REVOKED, ["to@example.org"])
    mailer.send_mail("From the healthy mailbox", "Body", SENDER, ["to@example.org"])

    call_command("send_mail")  # the cron job: must not crash

    (delivered,) = xoauth2_smtp_server.messages
    assert delivered.mail_from == SENDER
    (deferred,) = Message.objects.deferred()
    assert deferred.subject == "From the revoked mailbox"
    (log,) = MessageLog.objects.filter(result=RESULT_FAILURE)
    assert f"The mailbox {REVOKED} must be reconnected" in log.log_message

    # The next cron run, after the deferred mail was put back in the queue: deferred
    # again, at once (the mailbox is flagged), and still no crash.
    call_command("retry_deferred")
    call_command("send_mail")
    assert Message.objects.deferred().count() == 1
    assert len(xoauth2_smtp_server.messages) == 1
