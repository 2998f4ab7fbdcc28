"""XOAUTH2 and OAUTHBEARER (RFC 7628) against the package's own SMTP and OAuth2 servers:
the choice of mechanism, the bytes on the wire, and the refresh and revoked-consent paths."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from django.core import mail
from django.core.mail import EmailMessage
from django.utils import timezone

from django_xoauth2_mail.backends import EmailBackend
from django_xoauth2_mail.exceptions import (
    MailboxReconnectRequired,
    SMTPAuthenticationFailed,
    SMTPConnectionFailed,
)
from django_xoauth2_mail.models import MailboxStatus
from django_xoauth2_mail.providers.base import SMTPEndpoint
from django_xoauth2_mail.sending import sasl
from django_xoauth2_mail.sending.diagnostics import explain_auth_failure
from django_xoauth2_mail.sending.loop import mail_loop
from django_xoauth2_mail.sending.pool import pool
from tests.conftest import SENDER

pytestmark = pytest.mark.django_db(transaction=True)

BOTH = pytest.mark.parametrize(
    "smtp_sasl_mechanisms", [("XOAUTH2",), ("OAUTHBEARER",)], ids=["XOAUTH2", "OAUTHBEARER"]
)


def send() -> int:
    return mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])


def use_mechanism(settings, value: str) -> None:
    settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SASL_MECHANISM"] = value


# The bytes ---------------------------------------------------------------------------


def test_oauthbearer_initial_response_is_rfc_7628_section_3_1():
    raw = sasl.oauthbearer_response("user@example.com", "vF9dft4qmT", "server.example.com", 587)
    assert raw == (
        b"n,a=user@example.com,\x01host=server.example.com\x01port=587"
        b"\x01auth=Bearer vF9dft4qmT\x01\x01"
    )


def test_oauthbearer_escapes_the_gs2_authzid():
    # RFC 5801: "," and "=" would end or confuse the GS2 header.
    raw = sasl.oauthbearer_response("a,b=c@example.com", "t", "h", 25)
    assert raw.startswith(b"n,a=a=2Cb=3Dc@example.com,\x01")


def test_failure_answers_differ_by_mechanism():
    assert sasl.FAILURE_ANSWERS == {"XOAUTH2": b"", "OAUTHBEARER": b"AQ=="}


@pytest.mark.parametrize(
    ("setting", "offered", "chosen"),
    [
        ("auto", {"XOAUTH2", "OAUTHBEARER"}, "XOAUTH2"),
        ("auto", {"oauthbearer", "plain"}, "OAUTHBEARER"),
        ("OAUTHBEARER", {"XOAUTH2", "OAUTHBEARER"}, "OAUTHBEARER"),
        ("XOAUTH2", {"XOAUTH2"}, "XOAUTH2"),
    ],
)
def test_choose_mechanism(setting, offered, chosen):
    assert sasl.choose_mechanism(setting, offered) == chosen


def test_no_common_mechanism_names_what_the_server_offers():
    with pytest.raises(sasl.NoCommonMechanism) as caught:
        sasl.choose_mechanism("auto", {"plain", "login"})
    assert "LOGIN PLAIN" in str(caught.value) and "SASL_MECHANISM" in str(caught.value)


# Against the servers ------------------------------------------------------------------


@BOTH
def test_success(smtp_sasl_mechanisms, mailbox, xoauth2_smtp_server):
    assert send() == 1

    (attempt,) = xoauth2_smtp_server.auth_attempts
    assert attempt.mechanism == smtp_sasl_mechanisms[0]  # "auto" took what was offered
    assert attempt.accepted and attempt.initial_response_on_auth_line
    assert xoauth2_smtp_server.messages[0].auth_user == SENDER


def test_auto_prefers_xoauth2_when_both_are_offered(mailbox, xoauth2_smtp_server):
    assert send() == 1
    assert [a.mechanism for a in xoauth2_smtp_server.auth_attempts] == ["XOAUTH2"]


def test_oauthbearer_chosen_explicitly_when_both_are_offered(
    settings, mailbox, xoauth2_smtp_server
):
    use_mechanism(settings, "OAUTHBEARER")
    assert send() == 1
    assert [a.mechanism for a in xoauth2_smtp_server.auth_attempts] == ["OAUTHBEARER"]


@pytest.mark.parametrize("smtp_sasl_mechanisms", [("XOAUTH2",)])
def test_a_mechanism_the_server_does_not_offer_is_a_clear_error(
    settings, smtp_sasl_mechanisms, mailbox, xoauth2_smtp_server
):
    use_mechanism(settings, "OAUTHBEARER")
    with pytest.raises(SMTPConnectionFailed) as caught:
        send()
    message = str(caught.value)
    assert "offers XOAUTH2, not OAUTHBEARER" in message and "SASL_MECHANISM" in message
    assert xoauth2_smtp_server.auth_attempts == []  # no token was sent


@pytest.mark.parametrize("smtp_sasl_mechanisms", [()])
def test_auto_with_neither_mechanism_names_what_the_server_offers(
    smtp_sasl_mechanisms, mailbox, xoauth2_smtp_server
):
    with pytest.raises(SMTPConnectionFailed) as caught:
        send()
    assert "not XOAUTH2 or OAUTHBEARER" in str(caught.value)


@BOTH
def test_long_token_goes_after_the_servers_334(
    smtp_sasl_mechanisms, mailbox, oauth2_server, xoauth2_smtp_server
):
    # The mailbox has no cached access token: the one refreshed at send time is long.
    oauth2_server.access_token_length = 3000

    assert send() == 1

    (attempt,) = xoauth2_smtp_server.auth_attempts
    assert attempt.accepted and not attempt.initial_response_on_auth_line
    assert attempt.mechanism == smtp_sasl_mechanisms[0]
    assert len(attempt.token) == 3000


@BOTH
def test_expired_token_is_refreshed_once_and_retried(
    smtp_sasl_mechanisms, mailbox, xoauth2_smtp_server, oauth2_server
):
    mailbox.access_token = "expired-at-the-server"
    mailbox.access_token_expires_at = timezone.now() + dt.timedelta(hours=1)
    mailbox.save()

    assert send() == 1

    attempts = xoauth2_smtp_server.auth_attempts
    assert [a.accepted for a in attempts] == [False, True]
    assert {a.mechanism for a in attempts} == {smtp_sasl_mechanisms[0]}
    assert oauth2_server.token_request_count == 1


@BOTH
def test_revoked_consent_flags_the_mailbox_and_fails_fast(
    smtp_sasl_mechanisms, mailbox, xoauth2_smtp_server, oauth2_server
):
    # A cached token the SMTP server refuses (535), and a grant the provider refuses.
    mailbox.access_token = "revoked-with-its-grant"
    mailbox.access_token_expires_at = timezone.now() + dt.timedelta(hours=1)
    mailbox.save()
    oauth2_server.revoke(mailbox.refresh_token)

    with pytest.raises(MailboxReconnectRequired):
        send()

    (attempt,) = xoauth2_smtp_server.auth_attempts
    assert attempt.mechanism == smtp_sasl_mechanisms[0] and not attempt.accepted
    mailbox.refresh_from_db()
    assert mailbox.status == MailboxStatus.RECONNECT_REQUIRED
    calls = oauth2_server.token_request_count
    with pytest.raises(MailboxReconnectRequired):
        send()
    assert oauth2_server.token_request_count == calls  # fails fast: no network call
    assert len(xoauth2_smtp_server.auth_attempts) == 1


@pytest.mark.parametrize(
    ("smtp_sasl_mechanisms", "answer"),
    [(("XOAUTH2",), b""), (("OAUTHBEARER",), b"AQ==")],
    ids=["XOAUTH2", "OAUTHBEARER"],
)
def test_failure_handshake_byte_for_byte(
    smtp_sasl_mechanisms, answer, mailbox, oauth2_server, xoauth2_smtp_server
):
    xoauth2_smtp_server.validate_token = lambda user, token: False

    with pytest.raises(SMTPAuthenticationFailed) as caught:
        send()

    attempts = xoauth2_smtp_server.auth_attempts
    assert len(attempts) == 2  # refused, refreshed once, refused again
    port = xoauth2_smtp_server.port
    for attempt in attempts:
        if smtp_sasl_mechanisms == ("OAUTHBEARER",):
            expected = (
                f"n,a={SENDER},\x01host=127.0.0.1\x01port={port}"
                f"\x01auth=Bearer {attempt.token}\x01\x01"
            )
        else:
            expected = f"user={SENDER}\x01auth=Bearer {attempt.token}\x01\x01"
        assert attempt.initial_response == expected.encode()
        assert attempt.answer_to_challenge == answer
    error = caught.value
    assert error.smtp_code == 535
    message = str(error)
    assert f"refused {smtp_sasl_mechanisms[0]} authentication" in message
    assert "expected scope https://mail.google.com/" in message
    if smtp_sasl_mechanisms == ("OAUTHBEARER",):
        # RFC 7628's challenge names the issuer the server trusts; surfaced as is.
        assert "token status invalid_token" in message
        assert f"{oauth2_server.base_url}/.well-known/openid-configuration" in message
    for attempt in attempts:
        assert attempt.token not in message
        assert base64.b64encode(attempt.initial_response).decode() not in message


# The rest of the path does not depend on the mechanism ----------------------------------


@BOTH
def test_keep_alive_and_pipelining_hold(smtp_sasl_mechanisms, mailbox, xoauth2_smtp_server):
    try:
        for n in range(3):
            message = EmailMessage(f"K{n}", "Body", SENDER, ["a@example.org", "b@example.org"])
            assert EmailBackend(keep_alive=True).send_messages([message]) == 1
    finally:
        mail_loop.run(pool.close_all())

    (attempt,) = xoauth2_smtp_server.auth_attempts  # one login, kept alive
    assert attempt.mechanism == smtp_sasl_mechanisms[0]
    assert [m.rcpt_tos for m in xoauth2_smtp_server.messages] == [
        ["a@example.org", "b@example.org"]
    ] * 3


def test_the_message_bytes_are_the_same_with_either_mechanism(
    settings, mailbox, oauth2_server, xoauth2_smtp_server
):
    headers = {"Date": "Sun, 06 Dec 2026 04:00:00 +0000", "Message-ID": "<fixed@example.com>"}
    received = []
    for mechanism in ("XOAUTH2", "OAUTHBEARER"):
        use_mechanism(settings, mechanism)
        message = EmailMessage("Héllo", "Bödy\n.\nend", SENDER, ["to@example.org"], headers=headers)
        assert message.send() == 1
        received.append(xoauth2_smtp_server.messages[-1].data)

    assert [a.mechanism for a in xoauth2_smtp_server.auth_attempts] == ["XOAUTH2", "OAUTHBEARER"]
    assert received[0] == received[1]


def test_a_dovecot_refusal_gets_no_gmail_hint():
    endpoint = SMTPEndpoint("mail.example.com", 587, "starttls")
    challenge = {"status": "invalid_token", "scope": "email"}
    dovecot = explain_auth_failure(
        SENDER, endpoint, 535, "5.7.8 Authentication credentials invalid", challenge,
        mechanism="OAUTHBEARER", refreshed=True,
    )  # fmt: skip
    gmail = explain_auth_failure(
        SENDER, endpoint, 535, "5.7.8 Username and Password not accepted. Learn more", None,
        refreshed=True,
    )  # fmt: skip

    assert "refused OAUTHBEARER authentication" in dovecot and "Google" not in dovecot
    assert "token status invalid_token, expected scope email" in dovecot
    assert "Google refused the token" in gmail
