"""Faults: the network and the server misbehave, and no message is lost or sent twice."""

from __future__ import annotations

import time

import pytest
from django.core import mail
from django.core.mail import EmailMessage

from django_xoauth2_mail.backends import EmailBackend
from django_xoauth2_mail.devserver.smtp import DROP, HANG
from django_xoauth2_mail.exceptions import SendError
from django_xoauth2_mail.testing import XOAuth2SMTPServer
from tests.conftest import SENDER

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def fast_retries(settings, oauth2_settings):
    settings.XOAUTH2_MAIL["SMTP_RETRY_DELAYS"] = [0.01, 0.01]


def batch(count: int) -> list[EmailMessage]:
    return [EmailMessage(f"M{n}", "Body", SENDER, ["to@example.org"]) for n in range(count)]


def subjects(server) -> list[str]:
    import email

    return [email.message_from_bytes(m.data)["Subject"] for m in server.messages]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
def test_connection_dropped_between_messages_reconnects_and_goes_on(
    pipelining, settings, mailbox, oauth2_server
):
    with XOAuth2SMTPServer(oauth2_server.validate_access_token, pipelining=pipelining) as server:
        settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SMTP_PORT"] = server.port
        server.scripted_replies["AFTER_MESSAGE"] = ["250 ok", DROP]  # drop after the 2nd

        assert EmailBackend().send_messages(batch(4)) == 4

    assert subjects(server) == ["M0", "M1", "M2", "M3"]  # each exactly once, in order
    assert len(server.auth_attempts) == 2  # one reconnect


def test_no_reply_after_end_of_data_is_undetermined_and_not_resent(
    settings, mailbox, oauth2_server, post_sends
):
    with XOAuth2SMTPServer(oauth2_server.validate_access_token) as server:
        settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SMTP_PORT"] = server.port
        server.scripted_replies["DATA_END"] = ["250 ok", DROP]  # the 2nd message's reply is lost

        with pytest.raises(SendError) as caught:
            EmailBackend().send_messages(batch(3))

    assert subjects(server) == ["M0", "M1", "M2"]  # M1 reached the server once, never twice
    error = caught.value
    assert error.sent == 2  # M1 is not counted as sent
    (failure,) = error.failures
    assert failure.index == 1 and failure.undetermined
    assert "may or may not have been delivered" in str(error)
    assert [s["undetermined"] for s in post_sends] == [False, True, False]


@pytest.mark.parametrize(
    "code",
    [
        "421 4.7.0 Try again later",
        "450 4.2.1 Busy",
        "451 4.3.0 Local error",
        "452 4.5.3 Too many",
        "454 4.7.0 Temporary",
    ],
)
def test_transient_replies_are_retried(code, settings, mailbox, xoauth2_smtp_server):
    xoauth2_smtp_server.scripted_replies["MAIL"] = [code]

    assert mail.send_mail("Hi", "Body", SENDER, ["to@example.org"]) == 1
    assert len(xoauth2_smtp_server.messages) == 1


def test_transient_refusal_that_persists_fails_after_bounded_retries(mailbox, xoauth2_smtp_server):
    xoauth2_smtp_server.scripted_replies["DATA_END"] = ["451 4.3.0 Try later"] * 10

    started = time.monotonic()
    with pytest.raises(SendError, match="451 4.3.0"):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    assert time.monotonic() - started < 5
    assert xoauth2_smtp_server.scripted_replies["DATA_END"] == ["451 4.3.0 Try later"] * 7
    assert xoauth2_smtp_server.messages == []


@pytest.mark.parametrize(
    "code", ["550 5.7.1 Rejected", "552 5.3.4 Too big", "553 5.1.8 Bad sender", "554 5.7.1 Spam"]
)
def test_permanent_refusal_fails_that_message_only(code, mailbox, xoauth2_smtp_server):
    xoauth2_smtp_server.scripted_replies["DATA_END"] = ["250 ok", code]

    with pytest.raises(SendError) as caught:
        EmailBackend().send_messages(batch(3))

    assert subjects(xoauth2_smtp_server) == ["M0", "M2"]
    assert caught.value.sent == 2
    (failure,) = caught.value.failures
    assert failure.index == 1 and code in failure.error


def test_transiently_refused_recipient_is_retried_alone(mailbox, xoauth2_smtp_server):
    xoauth2_smtp_server.scripted_replies["RCPT"] = ["250 ok", "450 4.2.1 Mailbox busy"]

    assert mail.send_mail("Hi", "Body", SENDER, ["a@example.org", "b@example.org"]) == 1

    first, second = xoauth2_smtp_server.messages
    assert first.rcpt_tos == ["a@example.org"]
    assert second.rcpt_tos == ["b@example.org"]  # only the refused one, not a duplicate


def test_server_that_hangs_mid_data_ends_within_the_timeout(settings, mailbox, xoauth2_smtp_server):
    settings.XOAUTH2_MAIL["SMTP_TIMEOUT"] = 0.5
    xoauth2_smtp_server.scripted_replies["DATA_END"] = [HANG]

    started = time.monotonic()
    with pytest.raises(SendError) as caught:
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    assert time.monotonic() - started < 5
    assert caught.value.failures[0].undetermined


def test_message_over_the_advertised_size_is_refused_before_data(settings, mailbox, oauth2_server):
    with XOAuth2SMTPServer(oauth2_server.validate_access_token, size_limit=10_000) as server:
        settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SMTP_PORT"] = server.port
        message = EmailMessage("Big", "x", SENDER, ["to@example.org"])
        message.attach("big.bin", b"\0" * 20_000, "application/octet-stream")

        with pytest.raises(SendError, match="accepts at most 10000"):
            message.send()
    assert server.messages == []


def test_token_endpoint_down_is_a_clear_error_and_does_not_flag(mailbox, oauth2_server):
    from django_xoauth2_mail.exceptions import TokenRefreshError

    oauth2_server.fail_next_token_requests(5, status=503)
    with pytest.raises(TokenRefreshError) as caught:
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    assert "503" in str(caught.value) and "Nothing was sent" in str(caught.value)
    mailbox.refresh_from_db()
    assert mailbox.status == "connected"
    assert oauth2_server.token_request_count == 2  # TOKEN_REFRESH_ATTEMPTS in the tests


@pytest.mark.parametrize(
    "body",
    [
        b"<html>Bad gateway</html>",
        b'{"access_token": "x", "expires_in"',
        b'{"access_token": "abc"}',
    ],
    ids=["html", "truncated-json", "no-expires_in"],
)
def test_token_endpoint_garbage_is_a_clear_error(body, mailbox, oauth2_server):
    from django_xoauth2_mail.exceptions import TokenRefreshError

    oauth2_server.fail_next_token_requests(
        5, status=200, body=body, content_type="application/json"
    )
    with pytest.raises(TokenRefreshError):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])
    mailbox.refresh_from_db()
    assert mailbox.status == "connected"


def test_slow_token_endpoint_is_a_clear_error_within_the_timeout(settings, mailbox, oauth2_server):
    from django_xoauth2_mail.exceptions import TokenRefreshError

    settings.XOAUTH2_MAIL["HTTP_TIMEOUT"] = 0.3
    settings.XOAUTH2_MAIL["TOKEN_REFRESH_ATTEMPTS"] = 1
    oauth2_server.token_response_delay = 3
    started = time.monotonic()
    with pytest.raises(TokenRefreshError, match="did not answer within 0.3 s"):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])
    assert time.monotonic() - started < 2.5
    mailbox.refresh_from_db()
    assert mailbox.status == "connected"
