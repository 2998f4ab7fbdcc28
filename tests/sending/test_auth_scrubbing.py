"""An SMTP server (or a proxy) that quotes the AUTH line it refused must not put the
access token into the error, its ``smtp_error`` or the logs."""

from __future__ import annotations

import logging
import traceback

import pytest
from aiosmtplib.auth import auth_xoauth2_encode
from django.core import mail

from django_xoauth2_mail.exceptions import SMTPAuthenticationFailed
from django_xoauth2_mail.providers.scrub import REDACTED
from tests.conftest import SENDER, make_mailbox

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("code", ["535 5.7.8", "454 4.7.0"])
def test_a_reply_that_quotes_the_token_is_scrubbed(
    code, settings, real_backend, oauth2_settings, oauth2_server, xoauth2_smtp_server, caplog
):
    settings.XOAUTH2_MAIL["SMTP_RETRY_DELAYS"] = [0.01]
    mailbox = make_mailbox(oauth2_server, fresh=True)
    token = str(mailbox.access_token)
    line = auth_xoauth2_encode(SENDER, token).decode()
    echo = f"{code} Refused: AUTH XOAUTH2 {line} (token {token})"
    xoauth2_smtp_server.scripted_replies["AUTH"] = [echo] * 4

    with caplog.at_level(logging.DEBUG), pytest.raises(SMTPAuthenticationFailed) as caught:
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    error = caught.value
    # Every record but the test server's own (aiosmtpd logs what it receives).
    records = [record for record in caplog.records if record.name != "mail.log"]
    everything = "\n".join(
        [str(error), repr(error), str(error.smtp_error)]
        + traceback.format_exception(error)
        + [f"{record.getMessage()} {vars(record)!r}" for record in records]
    )
    for part in everything.split("\n"):
        assert token not in part and line not in part, part
    assert REDACTED in str(error)  # the echo arrived, scrubbed
