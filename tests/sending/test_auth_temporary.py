"""A 454 4.7.0 at AUTH (the server cannot check tokens right now) is temporary: the login
is retried with the same bounded backoff as other temporary refusals, with no token
refresh, and the mailbox is not flagged."""

from __future__ import annotations

import pytest
from django.core import mail

from django_xoauth2_mail.exceptions import SMTPAuthenticationFailed
from django_xoauth2_mail.models import MailboxStatus
from django_xoauth2_mail.testing import XOAuth2SMTPServer
from tests.conftest import SENDER

pytestmark = pytest.mark.django_db(transaction=True)

TEMPORARY = "454 4.7.0 Temporary authentication failure, try again later"


@pytest.fixture
def server(settings, mailbox, oauth2_server):
    settings.XOAUTH2_MAIL["SMTP_RETRY_DELAYS"] = [0.01, 0.01]
    with XOAuth2SMTPServer(oauth2_server.validate_access_token) as server:
        settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SMTP_PORT"] = server.port
        yield server


def test_a_454_that_clears_is_retried_with_the_same_token(server, mailbox, oauth2_server):
    server.scripted_replies["AUTH"] = [TEMPORARY]

    assert mail.send_mail("Hi", "Body", SENDER, ["to@example.org"]) == 1

    first, second = server.auth_attempts
    assert first.temporary_failure and second.accepted
    assert first.token == second.token  # no refresh between them
    assert oauth2_server.token_request_count == 1  # the refresh before sending, only


def test_a_454_that_persists_fails_after_the_bounded_retries_and_says_so(
    server, mailbox, oauth2_server
):
    server.scripted_replies["AUTH"] = [TEMPORARY] * 10

    with pytest.raises(SMTPAuthenticationFailed) as caught:
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    error = caught.value
    assert error.smtp_code == 454 and error.sent == 0
    assert len(server.auth_attempts) == 3  # one login + one retry per SMTP_RETRY_DELAYS entry
    assert len({attempt.token for attempt in server.auth_attempts}) == 1
    assert oauth2_server.token_request_count == 1  # not refreshed for a 454
    text = str(error)
    assert "3 login attempt(s)" in text and "retried 2 time(s)" in text
    assert "temporary" in text and "refresh and retry" not in text
    mailbox.refresh_from_db()
    assert mailbox.status == MailboxStatus.CONNECTED and not mailbox.last_error
    assert server.messages == []


def test_a_535_still_claims_its_one_refresh_truthfully(server, mailbox, oauth2_server):
    server.validate_token = lambda user, token: False

    with pytest.raises(SMTPAuthenticationFailed) as caught:
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    assert caught.value.smtp_code == 535
    assert "after one token refresh and retry" in str(caught.value)
    assert len(server.auth_attempts) == 2
