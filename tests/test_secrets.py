"""Tokens and client secrets never show: logs (DEBUG included), exceptions and
tracebacks, reprs, Django's technical 500 page, settings, dumpdata."""

from __future__ import annotations

import datetime as dt
import io
import logging
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from django.core import mail
from django.core.management import call_command
from django.test import RequestFactory
from django.utils import timezone
from django.views.debug import ExceptionReporter, SafeExceptionReporterFilter

from django_xoauth2_mail.exceptions import (
    MailboxReconnectRequired,
    SMTPAuthenticationFailed,
    TokenRefreshError,
)
from django_xoauth2_mail.models import Mailbox
from django_xoauth2_mail.providers import get_provider
from django_xoauth2_mail.testing import XOAuth2SMTPServer
from tests.conftest import SENDER

pytestmark = pytest.mark.django_db(transaction=True)

CLIENT_SECRET = "cs-9f8e7d6c5b4a-client-secret"


@pytest.fixture
def secret_client(settings, oauth2_settings, oauth2_server):
    oauth2_server.add_client("secret-client", CLIENT_SECRET)
    provider = settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]
    provider.update({"CLIENT_ID": "secret-client", "CLIENT_SECRET": CLIENT_SECRET})


@pytest.fixture
def every_log_record() -> Iterator[io.StringIO]:
    """Every record of every logger, at DEBUG, formatted with its arguments."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def secrets_of(mailbox: Mailbox, *extra: str) -> list[str]:
    mailbox = Mailbox.objects.get(pk=mailbox.pk)
    found = [CLIENT_SECRET, *extra]
    found += [token for token in (mailbox.access_token, mailbox.refresh_token) if token]
    return found


def assert_absent(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"a secret leaked: ...{secret[-6:]}"


def technical_500(exc: BaseException) -> str:
    """Django's error page for ``exc``, from the package's frames down (this test's
    own frame holds the secrets it looks for)."""
    traceback_ = exc.__traceback__
    while traceback_ is not None and traceback_.tb_frame.f_code.co_filename == __file__:
        traceback_ = traceback_.tb_next
    request = RequestFactory().get("/send")
    reporter = ExceptionReporter(request, type(exc), exc, traceback_)
    return reporter.get_traceback_html() + reporter.get_traceback_text()


def exception_texts(exc: BaseException) -> str:
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


def test_a_refused_token_leaks_nowhere(
    settings, real_backend, secret_client, oauth2_server, every_log_record
):
    issued = oauth2_server.issue_tokens(SENDER, client_id="secret-client")
    mailbox = Mailbox.objects.create(
        email=SENDER,
        provider="oauth2",
        refresh_token=issued["refresh_token"],
        access_token=issued["access_token"],
        access_token_expires_at=timezone.now() + dt.timedelta(hours=1),
    )

    with XOAuth2SMTPServer(lambda user, token: False) as server:
        settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SMTP_PORT"] = server.port
        with pytest.raises(SMTPAuthenticationFailed) as caught:
            mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    tried = [attempt.token for attempt in server.auth_attempts]
    assert len(tried) == 2  # the cached token and the refreshed one
    secrets = secrets_of(mailbox, issued["access_token"], issued["refresh_token"], *tried)
    assert_absent(exception_texts(caught.value), secrets)
    assert_absent(technical_500(caught.value), secrets)
    assert_absent(every_log_record.getvalue(), secrets)
    assert "SMTP refused the token" in every_log_record.getvalue()  # logging did happen


def test_a_revoked_consent_leaks_nowhere(mailbox, secret_client, oauth2_server, every_log_record):
    refresh_token = mailbox.refresh_token
    oauth2_server.revoke(refresh_token)
    with pytest.raises(MailboxReconnectRequired) as caught:
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    secrets = secrets_of(mailbox, refresh_token)
    assert_absent(exception_texts(caught.value), secrets)
    assert_absent(technical_500(caught.value), secrets)
    assert_absent(every_log_record.getvalue(), secrets)


def test_a_token_endpoint_answer_without_expiry_leaks_nowhere(
    mailbox, secret_client, oauth2_server, every_log_record
):
    body = b'{"access_token": "at-leaky-4f3e2d1c", "token_type": "Bearer"}'
    oauth2_server.fail_next_token_requests(
        5, status=200, body=body, content_type="application/json"
    )
    with pytest.raises(TokenRefreshError) as caught:
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    secrets = secrets_of(mailbox, "at-leaky-4f3e2d1c")
    assert_absent(exception_texts(caught.value), secrets)
    assert_absent(technical_500(caught.value), secrets)
    assert_absent(every_log_record.getvalue(), secrets)


def test_successful_sends_log_no_secret_at_debug(
    mailbox, secret_client, xoauth2_smtp_server, every_log_record
):
    for _ in range(2):
        assert mail.send_mail("Hi", "Body", SENDER, ["to@example.org"]) == 1
    assert_absent(every_log_record.getvalue(), secrets_of(mailbox))


def test_settings_are_cleansed_on_the_error_page(settings, secret_client):
    from cryptography.fernet import Fernet

    key = Fernet.generate_key().decode()
    settings.XOAUTH2_MAIL["ENCRYPTION_KEYS"] = [key]
    safe = SafeExceptionReporterFilter().get_safe_settings()
    text = repr(safe["XOAUTH2_MAIL"])
    # The setting's name contains AUTH, which Django's filter hides whole.
    assert CLIENT_SECRET not in text and key not in text
    assert safe["XOAUTH2_MAIL"] == SafeExceptionReporterFilter.cleansed_substitute


def test_reprs_hold_no_token(mailbox, secret_client, oauth2_server):
    from django_xoauth2_mail.providers.base import ConsentResult, TokenResult
    from django_xoauth2_mail.sending.messages import build_envelope

    mailbox.access_token = "at-in-repr-11aa22bb"
    objects: list[Any] = [
        mailbox,
        get_provider("oauth2"),
        TokenResult(
            access_token="at-in-repr-11aa22bb",
            expires_at=timezone.now(),
            refresh_token="rt-in-repr-33cc",
        ),
        ConsentResult(
            email=SENDER,
            access_token="at-in-repr-11aa22bb",
            expires_at=timezone.now(),
            refresh_token="rt-in-repr-33cc",
        ),
        build_envelope(mail.EmailMessage("S", "at-in-repr-11aa22bb", SENDER, ["a@example.org"])),
    ]
    for obj in objects:
        assert_absent(
            repr(obj) + str(obj), ["at-in-repr-11aa22bb", "rt-in-repr-33cc", CLIENT_SECRET]
        )


def test_dumpdata_holds_no_token(mailbox):
    out = io.StringIO()
    call_command("dumpdata", "django_xoauth2_mail", stdout=out)
    assert_absent(out.getvalue(), secrets_of(mailbox)[1:])
