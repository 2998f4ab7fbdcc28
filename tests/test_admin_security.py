"""The admin's consent flow and mailbox pages under attack or in trouble: the error
report mailed to ADMINS, mix-up (RFC 9207), unidentified accounts, undecryptable rows,
deleting a mailbox, and what a cookie-based session lets the browser see."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlencode, urlsplit

import pytest
from cryptography.fernet import Fernet
from django.contrib.sessions.serializers import JSONSerializer
from django.core import signing
from django.core.management import call_command
from django.core.signals import got_request_exception
from django.test import Client
from django.views.debug import ExceptionReporter

from django_xoauth2_mail.consent.flows import ConsentError, check_issuer
from django_xoauth2_mail.crypto import decrypt
from django_xoauth2_mail.models import Mailbox
from django_xoauth2_mail.providers import get_provider
from django_xoauth2_mail.testing import OAuth2Server
from django_xoauth2_mail.testing.fixtures import TEST_CLIENT_ID, TEST_CLIENT_SECRET
from django_xoauth2_mail.views import SESSION_KEY, PendingFlow
from tests import test_admin as admin_tests
from tests.conftest import SENDER, make_mailbox
from tests.providers import conftest as provider_fixtures
from tests.test_admin import (
    CALLBACK,
    CHANGELIST,
    CONNECT,
    REDIRECT_URI,
    answer_consent,
    make_staff,
    messages_of,
)

pytestmark = pytest.mark.django_db(transaction=True)

# The Microsoft provider against the dev server over HTTPS (tests/providers/conftest.py).
https_oauth2_server = provider_fixtures.https_oauth2_server
microsoft_smtp_server = provider_fixtures.microsoft_smtp_server
microsoft_settings = provider_fixtures.microsoft_settings
# The oauth2 provider at the dev server, with userinfo and revocation (tests/test_admin.py).
provider_settings = admin_tests.provider_settings

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
    """The PKCE verifier of a pending flow, unsealed as the callback does."""
    entry: dict[str, Any] = client.session[SESSION_KEY][state]
    return str(json.loads(decrypt(entry["sealed"]))["code_verifier"])


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


# Item: mix-up (RFC 9207) -------------------------------------------------------------


@pytest.fixture
def attacker_server() -> Iterator[OAuth2Server]:
    """A configured authorization server that turned malicious."""
    with OAuth2Server() as server:
        server.add_client("attacker-client", "attacker-secret", [REDIRECT_URI])
        yield server


@pytest.fixture
def two_providers(settings, oauth2_server, attacker_server) -> None:
    """``dev``: the honest server (it sends iss); ``oauth2``: the malicious one."""
    oauth2_server.add_client(TEST_CLIENT_ID, TEST_CLIENT_SECRET, [REDIRECT_URI])
    settings.XOAUTH2_MAIL = {
        "PROVIDERS": {
            "dev": {
                "BASE_URL": oauth2_server.base_url,
                "CLIENT_ID": TEST_CLIENT_ID,
                "CLIENT_SECRET": TEST_CLIENT_SECRET,
            },
            "oauth2": {
                "CLIENT_ID": "attacker-client",
                "CLIENT_SECRET": "attacker-secret",
                "AUTHORIZATION_URL": attacker_server.authorization_url,
                "TOKEN_URL": attacker_server.token_url,
                "SMTP_HOST": "127.0.0.1",
            },
        },
        "HTTP_TIMEOUT": 5,
    }


def test_a_mix_up_is_refused_before_the_code_leaves(
    staff_client, two_providers, oauth2_server, attacker_server
):
    started = urlsplit(start_flow(staff_client, "oauth2"))
    # The malicious server sends the browser on to the honest one, with the admin's
    # redirect URI, state and PKCE challenge, hoping to be handed the honest code.
    bounced = dict(parse_qsl(started.query), client_id=TEST_CLIENT_ID)
    callback_url = answer_consent(
        f"{oauth2_server.authorization_url}?{urlencode(bounced)}", email=SENDER
    )
    assert parse_qs(urlsplit(callback_url).query)["iss"] == [oauth2_server.base_url]

    response = staff_client.get(callback_url, follow=True)

    (text,) = messages_of(response)
    assert f"The answer was sent by {oauth2_server.base_url}" in text and "mix-up" in text
    assert attacker_server.token_request_count == 0  # neither the code nor the verifier
    assert oauth2_server.token_request_count == 0
    assert not Mailbox.objects.exists()


def test_the_dev_server_names_itself_and_the_flow_completes(
    staff_client, two_providers, oauth2_server
):
    callback_url = answer_consent(start_flow(staff_client, "dev"), email=SENDER)
    assert parse_qs(urlsplit(callback_url).query)["iss"] == [oauth2_server.base_url]

    response = staff_client.get(callback_url, follow=True)

    assert any(text.startswith(f"Connected {SENDER}: ") for text in messages_of(response))
    assert Mailbox.objects.get().provider == "dev"


@pytest.mark.parametrize("iss", [None, "http://127.0.0.1:1/elsewhere"])
def test_an_answer_without_or_with_another_iss_is_refused(
    iss, staff_client, two_providers, oauth2_server
):
    callback_url = answer_consent(start_flow(staff_client, "dev"), email=SENDER)
    params = dict(parse_qsl(urlsplit(callback_url).query))
    del params["iss"]
    if iss is not None:
        params["iss"] = iss

    response = staff_client.get(CALLBACK, params, follow=True)

    (text,) = messages_of(response)
    assert "Nothing was saved" in text
    assert ("no iss parameter" in text) if iss is None else (f"sent by {iss}" in text)
    assert oauth2_server.token_request_count == 0 and not Mailbox.objects.exists()


def test_google_checks_iss_against_its_own_issuer(settings):
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"google": {"CLIENT_ID": "c", "CLIENT_SECRET": "s"}}}
    google = get_provider("google")
    check_issuer(google, "https://accounts.google.com")
    check_issuer(google, None)  # not required: Google's metadata does not promise it
    with pytest.raises(ConsentError, match="sent by https://evil.example"):
        check_issuer(google, "https://evil.example")


# Item: deleting a mailbox revokes its grant ----------------------------------------------


@pytest.fixture
def deleting_client(provider_settings, django_user_model) -> Client:
    client = Client()
    client.force_login(
        make_staff(django_user_model, "deleter", "view_mailbox", "change_mailbox", "delete_mailbox")
    )
    return client


REVOKE_NOTICE = "Deleting a mailbox also ends its consent: its grant is revoked at the provider"


def test_deleting_a_mailbox_revokes_its_grant(deleting_client, oauth2_server):
    mailbox = make_mailbox(oauth2_server, fresh=True)
    url = f"{CHANGELIST}{mailbox.pk}/delete/"

    confirmation = deleting_client.get(url)
    assert REVOKE_NOTICE in confirmation.content.decode()
    response = deleting_client.post(url, {"post": "yes"}, follow=True)

    assert not Mailbox.objects.exists()
    assert not oauth2_server.validate_access_token(SENDER, mailbox.access_token)
    assert f"Deleted {SENDER}: the provider revoked its grant." in messages_of(response)


def test_delete_selected_revokes_each_grant(deleting_client, oauth2_server):
    boxes = [make_mailbox(oauth2_server, f"{n}@example.com", fresh=True) for n in ("a", "b")]
    selection = {"action": "delete_selected", "_selected_action": [m.pk for m in boxes]}

    confirmation = deleting_client.post(CHANGELIST, selection)
    assert REVOKE_NOTICE in confirmation.content.decode()
    response = deleting_client.post(CHANGELIST, {**selection, "post": "yes"}, follow=True)

    assert not Mailbox.objects.exists()
    for mailbox in boxes:
        assert not oauth2_server.validate_access_token(mailbox.email, mailbox.access_token)
        assert f"Deleted {mailbox.email}: the provider revoked its grant." in messages_of(response)


def test_deleting_without_revocation_says_what_to_do(
    deleting_client, oauth2_server, provider_settings
):
    del provider_settings["PROVIDERS"]["oauth2"]["REVOCATION_URL"]
    mailbox = make_mailbox(oauth2_server, fresh=True)

    response = deleting_client.post(
        f"{CHANGELIST}{mailbox.pk}/delete/", {"post": "yes"}, follow=True
    )

    assert not Mailbox.objects.exists()
    assert any(
        "the provider did not revoke its grant" in text and "remove this application" in text
        for text in messages_of(response)
    )


# Item: the typed address, when the provider does not say who consented --------------


@pytest.fixture
def anonymous_provider(provider_settings):
    """The oauth2 provider without userinfo nor openid scope: it never names the account."""
    del provider_settings["PROVIDERS"]["oauth2"]["USERINFO_URL"]
    return provider_settings


def connect_as(client: Client, *, ask: str, consent_as: str, accept: bool = False) -> Any:
    data = {"provider": "oauth2", "email": ask}
    if accept:
        data["accept_unidentified"] = "on"
    response = client.post(CONNECT, data)
    assert response.status_code == 302, response.content.decode()
    return client.get(answer_consent(response["Location"], email=consent_as), follow=True)


def test_an_unidentified_consent_cannot_take_over_a_mailbox(
    staff_client, anonymous_provider, oauth2_server
):
    victim = make_mailbox(oauth2_server, "b@example.com", fresh=True)

    response = connect_as(staff_client, ask="b@example.com", consent_as="a@example.com")

    (text,) = messages_of(response)
    assert "did not say which account gave consent" in text and "Nothing was saved" in text
    kept = Mailbox.objects.get()
    assert kept.refresh_token == victim.refresh_token and kept.access_token == victim.access_token


def test_an_unidentified_consent_replaces_a_grant_when_accepted(
    staff_client, anonymous_provider, oauth2_server
):
    old = make_mailbox(oauth2_server, "b@example.com", fresh=True)

    response = connect_as(
        staff_client, ask="b@example.com", consent_as="b@example.com", accept=True
    )

    assert any(text.startswith("Reconnected b@example.com") for text in messages_of(response))
    assert Mailbox.objects.get().refresh_token != old.refresh_token


def test_an_unidentified_consent_may_create_a_mailbox(staff_client, anonymous_provider):
    response = connect_as(staff_client, ask="new@example.com", consent_as="new@example.com")

    assert any(text.startswith("Connected new@example.com") for text in messages_of(response))
    assert Mailbox.objects.get().email == "new@example.com"


# Item: a row whose tokens cannot be decrypted ----------------------------------------


@pytest.fixture
def key_changed(oauth2_server, provider_settings) -> Mailbox:
    """A mailbox saved under the old key, then the key changed without a fallback
    (a production copy restored to staging); and one healthy mailbox."""
    provider_settings["ENCRYPTION_KEYS"] = [Fernet.generate_key().decode()]
    stale = make_mailbox(oauth2_server, "stale@example.com", fresh=True)
    # (ENCRYPTION_KEYS rather than SECRET_KEY, which would also end the admin's session.)
    provider_settings["ENCRYPTION_KEYS"] = [Fernet.generate_key().decode()]
    make_mailbox(oauth2_server, "healthy@example.com", fresh=True)
    return stale


def test_undecryptable_rows_are_listed_and_shown(deleting_client, key_changed):
    changelist = deleting_client.get(CHANGELIST)
    change = deleting_client.get(f"{CHANGELIST}{key_changed.pk}/change/")
    delete = deleting_client.get(f"{CHANGELIST}{key_changed.pk}/delete/")
    reconnect = deleting_client.get(f"{CONNECT}?mailbox={key_changed.pk}")

    for page in (changelist, change, delete, reconnect):
        assert page.status_code == 200
    body = changelist.content.decode()
    assert body.count("xoauth2-status-undecryptable") == 1 and "Cannot be decrypted" in body
    assert "healthy@example.com" in body and body.count("xoauth2-status-connected") == 1
    assert "cannot be decrypted with the configured keys" in change.content.decode()


def test_reconnect_replaces_tokens_it_cannot_read(deleting_client, key_changed, oauth2_server):
    response = connect_as(deleting_client, ask="stale@example.com", consent_as="stale@example.com")

    assert any(t.startswith("Reconnected stale@example.com") for t in messages_of(response))
    mailbox = Mailbox.objects.get(email="stale@example.com")
    assert oauth2_server.validate_access_token(mailbox.email, mailbox.access_token)
    assert mailbox.refresh_token  # readable again, under the new key


def test_disconnect_and_delete_wipe_tokens_they_cannot_read(deleting_client, key_changed):
    data = {"action": "disconnect_mailboxes", "_selected_action": [key_changed.pk], "post": "yes"}
    response = deleting_client.post(CHANGELIST, data, follow=True)

    assert response.status_code == 200
    wiped = Mailbox.objects.get(email="stale@example.com")
    assert (wiped.status, wiped.refresh_token, wiped.access_token) == ("disconnected", None, None)


def test_refresh_action_reports_an_undecryptable_row(deleting_client, key_changed):
    data = {"action": "refresh_access_token_now", "_selected_action": [key_changed.pk]}

    response = deleting_client.post(CHANGELIST, data, follow=True)

    (text,) = messages_of(response)
    assert "cannot be decrypted" in text


def test_deleting_an_undecryptable_row(deleting_client, key_changed):
    response = deleting_client.post(
        f"{CHANGELIST}{key_changed.pk}/delete/", {"post": "yes"}, follow=True
    )

    assert response.status_code == 200
    assert not Mailbox.objects.filter(email="stale@example.com").exists()


def test_disconnect_mailbox_command_wipes_tokens_it_cannot_read(key_changed):
    stdout, stderr = io.StringIO(), io.StringIO()

    call_command("disconnect_mailbox", "stale@example.com", stdout=stdout, stderr=stderr)

    assert "cannot be decrypted with the configured keys" in stderr.getvalue()
    assert "Wiped the stored tokens of stale@example.com" in stdout.getvalue()
    wiped = Mailbox.objects.get(email="stale@example.com")
    assert (wiped.status, wiped.refresh_token, wiped.access_token) == ("disconnected", None, None)


# Item: the PKCE verifier in a cookie-based session --------------------------------------


def test_a_cookie_session_does_not_carry_the_verifier_readably(
    settings, provider_settings, django_user_model, oauth2_server
):
    settings.SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
    client = Client()
    client.force_login(make_staff(django_user_model, "staff", "view_mailbox", "change_mailbox"))
    authorization_url = start_flow(client, "oauth2")
    challenge = parse_qs(urlsplit(authorization_url).query)["code_challenge"][0]

    # What the browser holds, and anyone who reads its cookies: signed, not encrypted.
    cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
    session = signing.loads(
        cookie,
        salt="django.contrib.sessions.backends.signed_cookies",
        serializer=JSONSerializer,
    )
    assert "code_verifier" not in json.dumps(session)
    verifier = pending_verifier(client, state_of(authorization_url))  # sealed, but there
    digest = hashlib.sha256(verifier.encode()).digest()
    assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == challenge
    assert verifier not in json.dumps(session)

    # The flow still completes with the session in the cookie.
    response = client.get(answer_consent(authorization_url, email=SENDER), follow=True)
    assert any(text.startswith(f"Connected {SENDER}") for text in messages_of(response))
