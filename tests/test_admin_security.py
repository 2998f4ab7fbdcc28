"""The admin's consent flow and mailbox pages under attack or in trouble: the error
report mailed to ADMINS, mix-up (RFC 9207), unidentified accounts, undecryptable rows,
deleting a mailbox, and what a cookie-based session lets the browser see."""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.core.signals import got_request_exception
from django.test import Client
from django.views.debug import ExceptionReporter

from django_xoauth2_mail.views import SESSION_KEY, PendingFlow
from tests.providers import conftest as provider_fixtures
from tests.test_admin import CALLBACK, CONNECT, REDIRECT_URI, make_staff

pytestmark = pytest.mark.django_db(transaction=True)

# The Microsoft provider against the dev server over HTTPS (tests/providers/conftest.py).
https_oauth2_server = provider_fixtures.https_oauth2_server
microsoft_smtp_server = provider_fixtures.microsoft_smtp_server
microsoft_settings = provider_fixtures.microsoft_settings

ACCESS_TOKEN = "at-4c1d6b0e9f8a-new-access-token"
REFRESH_TOKEN = "rt-7e2a5c9d3b1f-new-refresh-token"


@pytest.fixture
def staff_client(django_user_model) -> Client:
    client = Client()
    client.force_login(make_staff(django_user_model, "staff", "view_mailbox", "change_mailbox"))
    return client


def start_flow(client: Client, provider: str, email: str = "") -> str:
    response = client.post(CONNECT, {"provider": provider, "email": email})
    assert response.status_code == 302, response.content.decode()
    return str(response["Location"])


def state_of(authorization_url: str) -> str:
    return parse_qs(urlsplit(authorization_url).query)["state"][0]


def pending_verifier(client: Client, state: str) -> str:
    entry: dict[str, Any] = client.session[SESSION_KEY][state]
    return str(entry["code_verifier"])


# Item: the mailed error report ------------------------------------------------------


def test_a_crash_in_the_code_exchange_mails_no_secret(
    staff_client,
    microsoft_settings,
    https_oauth2_server,
):
    state = state_of(start_flow(staff_client, "microsoft"))
    verifier = pending_verifier(staff_client, state)
    # The token endpoint answers with tokens and an id_token msal cannot decode.
    https_oauth2_server.fail_next_token_requests(
        1,
        status=200,
        body=json.dumps(
            {
                "token_type": "Bearer",
                "access_token": ACCESS_TOKEN,
                "refresh_token": REFRESH_TOKEN,
                "expires_in": 3600,
                "scope": "https://outlook.office.com/SMTP.Send offline_access",
                "id_token": "e30.WzFd.",  # claims: [1], not an object,
            }
        ).encode(),
        content_type="application/json",
    )
    reports: list[str] = []

    def mail_report(sender: Any, request: Any, **kwargs: Any) -> None:
        # What AdminEmailHandler mails to ADMINS with DEBUG=False, from the same
        # exc_info (the handler's frame down to the failure): text and HTML.
        exc_type, exc_value, tb = sys.exc_info()
        reporter = ExceptionReporter(request, exc_type, exc_value, tb, is_email=True)
        reports.extend((reporter.get_traceback_text(), reporter.get_traceback_html()))

    got_request_exception.connect(mail_report)
    try:
        with pytest.raises(TypeError):  # msal, reading the claims of the id_token
            staff_client.get(CALLBACK, {"state": state, "code": "the-code"})
    finally:
        got_request_exception.disconnect(mail_report)

    assert len(reports) == 2
    for report in reports:
        assert "_finish_flow" in report  # the frames are there, their values are not
        for secret in (ACCESS_TOKEN, REFRESH_TOKEN, verifier, "test-secret"):
            assert secret not in report
    assert verifier not in repr(PendingFlow("x", verifier, REDIRECT_URI, None, "1", 0.0))
