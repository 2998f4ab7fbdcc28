"""Every logger at DEBUG, written as JSON with each record's ``extra``, as structured-logging
setups do: the real google-auth service-account path and the real msal code exchange
must not put the JWT assertion, the authorization code or the PKCE verifier in it."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from django_xoauth2_mail.consent.flows import make_pkce_pair
from django_xoauth2_mail.providers.google import GoogleProvider
from django_xoauth2_mail.providers.library_logs import (
    MSAL_CREDENTIAL_LOGGERS,
    credentials_kept_out_of_debug_logs,
)
from django_xoauth2_mail.providers.microsoft import MicrosoftProvider
from django_xoauth2_mail.testing import OAuth2Server
from tests.conftest import SENDER
from tests.providers.conftest import JWTBearerServer, approve

pytestmark = pytest.mark.django_db(transaction=True)

REDIRECT_URI = "http://localhost:8400/"
# The attributes every LogRecord has; anything else on a record came from ``extra``.
STANDARD_ATTRIBUTES = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """One JSON object per record, with the message and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in STANDARD_ATTRIBUTES}
        fields = {"logger": record.name, "level": record.levelname}
        return json.dumps({**fields, "message": record.getMessage(), **extra}, default=str)


class JSONLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JSONFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def debug_log() -> Iterator[JSONLines]:
    """Root and every logger known so far at DEBUG, propagating and enabled (google-auth
    stops the ``google`` logger from propagating unless the site configured it)."""
    manager = logging.Logger.manager
    loggers = [logging.getLogger(), logging.getLogger("google"), logging.getLogger("msal")]
    loggers += [lg for lg in manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    saved = [(lg, lg.level, lg.propagate, lg.disabled) for lg in loggers]
    handler = JSONLines()
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.propagate, logger.disabled = True, False
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)
        for logger, level, propagate, disabled in saved:
            logger.setLevel(level)
            logger.propagate, logger.disabled = propagate, disabled


class RecordingJWTBearerServer(JWTBearerServer):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.assertions: list[str] = []

    def answer(self, method: str, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        self.assertions.append(form.get("assertion", ""))
        return super().answer(method, path, form)


@pytest.fixture
def jwt_bearer_server(
    service_account_key: rsa.RSAPrivateKey, oauth2_server: OAuth2Server
) -> Iterator[RecordingJWTBearerServer]:
    issue = lambda email: str(oauth2_server.issue_tokens(email)["access_token"])  # noqa: E731
    with RecordingJWTBearerServer(service_account_key.public_key(), issue) as server:
        yield server


def test_google_service_account_assertion_stays_out_of_debug_logs(
    google_settings, service_account_info, jwt_bearer_server, debug_log
):
    google_settings["SERVICE_ACCOUNT_INFO"] = service_account_info
    del google_settings["TOKEN_URL"]

    result = GoogleProvider(google_settings).refresh_access_token("alice@example.com", None)

    [assertion] = jwt_bearer_server.assertions
    assert assertion.count(".") == 2 and debug_log.lines  # a JWT went out; DEBUG is on
    assert assertion not in debug_log.text
    assert assertion.split(".")[2] not in debug_log.text  # nor its signature alone
    assert result.access_token not in debug_log.text


@pytest.mark.parametrize("client", ["confidential", "public"])
def test_msal_code_exchange_keeps_code_and_verifier_out_of_debug_logs(
    client, microsoft_settings, tls_certificate, debug_log
):
    if client == "public":
        microsoft_settings.update(CLIENT_ID="public-client", CLIENT_SECRET="")
    provider, pkce = MicrosoftProvider(microsoft_settings), make_pkce_pair()
    url = provider.authorization_url(
        redirect_uri=REDIRECT_URI, state="s", code_challenge=pkce.challenge
    )
    code = approve(url, SENDER, verify=tls_certificate[0])["code"]
    debug_log.lines.clear()

    result = provider.exchange_code(
        code=code, redirect_uri=REDIRECT_URI, code_verifier=pkce.verifier
    )

    assert result.email == SENDER and debug_log.lines
    for secret in (code, pkce.verifier, result.access_token, result.refresh_token or "?"):
        assert secret not in debug_log.text


def test_only_debug_records_made_inside_the_call_are_dropped(debug_log):
    logger = logging.getLogger(MSAL_CREDENTIAL_LOGGERS[0])
    other_thread_logged = threading.Event()

    def log_from_another_thread() -> None:
        logger.debug("other thread, debug")
        other_thread_logged.set()

    with credentials_kept_out_of_debug_logs(MSAL_CREDENTIAL_LOGGERS):
        logger.debug("inside, debug")
        logger.warning("inside, warning")
        thread = threading.Thread(target=log_from_another_thread)
        thread.start()
        thread.join(timeout=5)
    logger.debug("after, debug")

    assert other_thread_logged.is_set()
    messages = [json.loads(line)["message"] for line in debug_log.lines]
    assert messages == ["inside, warning", "other thread, debug", "after, debug"]
