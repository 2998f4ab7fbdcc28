"""The Mailbox admin end to end: Django's test client for the admin, the real
local OAuth2 server over HTTP for the consent (its HTML consent page posted
with requests), and the XOAUTH2 SMTP server for the test-email action."""

from __future__ import annotations

import datetime as dt
import email
import re
from html.parser import HTMLParser
from urllib.parse import parse_qs, urljoin, urlsplit

import pytest
import requests
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from django_xoauth2_mail import tokens
from django_xoauth2_mail.models import Mailbox, MailboxStatus
from django_xoauth2_mail.testing.fixtures import TEST_CLIENT_ID, TEST_CLIENT_SECRET
from django_xoauth2_mail.views import SESSION_KEY
from tests.conftest import SENDER, make_mailbox

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = "/admin/django_xoauth2_mail/mailbox/"
CONNECT = "/admin/django_xoauth2_mail/mailbox/connect/"
CALLBACK = "/admin/django_xoauth2_mail/mailbox/connect/callback/"
# What the test client's requests build with request.build_absolute_uri().
REDIRECT_URI = f"http://testserver{CALLBACK}"
STAFF_EMAIL = "staff@example.org"


# Fixtures and helpers ----------------------------------------------------------


@pytest.fixture
def provider_settings(oauth2_settings, oauth2_server, real_backend):
    """The oauth2 provider with the endpoints a consent flow uses, and the
    admin's redirect URI registered for the test client, as a site would."""
    oauth2_settings["PROVIDERS"]["oauth2"] |= {
        "USERINFO_URL": oauth2_server.userinfo_url,
        "REVOCATION_URL": oauth2_server.revocation_url,
    }
    oauth2_server.add_client(TEST_CLIENT_ID, TEST_CLIENT_SECRET, [REDIRECT_URI])
    return oauth2_settings


def make_staff(django_user_model, username, *codenames, email=STAFF_EMAIL):
    user = django_user_model.objects.create_user(username, email, "pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="django_xoauth2_mail", codename__in=codenames
        )
    )
    return user


@pytest.fixture
def staff(django_user_model):
    return make_staff(django_user_model, "staff", "view_mailbox", "change_mailbox")


@pytest.fixture
def staff_client(provider_settings, staff):
    client = Client()
    client.force_login(staff)
    return client


class _ConsentForm(HTMLParser):
    """The oauth2_server consent page's form: its action and its input values."""

    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "form":
            self.action = values.get("action") or ""
        elif tag == "input" and values.get("name"):
            self.fields[values["name"] or ""] = values.get("value") or ""


def answer_consent(authorization_url: str, *, email: str | None, decision: str = "allow") -> str:
    """Open the provider's consent page, press Allow (or Deny): the callback URL."""
    page = requests.get(authorization_url, timeout=10)
    assert page.status_code == 200, page.text
    form = _ConsentForm()
    form.feed(page.text)
    if email is not None:
        form.fields["email"] = email
    form.fields["decision"] = decision
    answer = requests.post(
        urljoin(authorization_url, form.action),
        data=form.fields,
        allow_redirects=False,
        timeout=10,
    )
    assert answer.status_code == 302, answer.text
    return answer.headers["Location"]


def start_flow(client: Client, email: str = "", provider: str = "oauth2") -> str:
    response = client.post(CONNECT, {"provider": provider, "email": email})
    assert response.status_code == 302, response.content.decode()
    return response["Location"]


def connect(client: Client, *, ask: str = "", consent_as: str | None = SENDER):
    """The whole flow through the browser's eyes; the callback's response."""
    callback_url = answer_consent(start_flow(client, ask), email=consent_as)
    return client.get(callback_url, follow=True)


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def run_action(client: Client, action: str, *mailboxes: Mailbox, **extra: str):
    data = {"action": action, "_selected_action": [m.pk for m in mailboxes], **extra}
    return client.post(CHANGELIST, data, follow=True)


def assert_no_token(response, *secrets: str | None) -> None:
    body = response.content.decode()
    for secret in secrets:
        assert secret and secret not in body


# Pages -------------------------------------------------------------------------


def test_change_list_shows_status_and_never_a_token(staff_client, oauth2_server):
    healthy = make_mailbox(oauth2_server, "ok@example.com", fresh=True)
    flagged = make_mailbox(oauth2_server, "flagged@example.com", fresh=True)
    flagged.status = MailboxStatus.RECONNECT_REQUIRED
    flagged.last_error = "invalid_grant: Token has been expired or revoked. " + "x" * 200
    flagged.save()

    response = staff_client.get(CHANGELIST)

    assert response.status_code == 200
    body = response.content.decode()
    assert "ok@example.com" in body and "flagged@example.com" in body
    assert "xoauth2-status-reconnect_required" in body and "Reconnect required" in body
    assert f'href="{CONNECT}?mailbox={flagged.pk}"' in body
    assert f'href="{CONNECT}?mailbox={healthy.pk}"' not in body
    # Truncated in the cell; the whole text is in its tooltip.
    assert re.search(r'">invalid_grant: Token has been expired or revoked\. x{1,40}…</span>', body)
    assert f'href="{CONNECT}"' in body  # the Connect mailbox button
    flagged_page = staff_client.get(f"{CHANGELIST}{flagged.pk}/change/").content.decode()
    assert "cannot send: the provider no longer accepts its consent" in flagged_page
    for page in (
        response,
        staff_client.get(f"{CHANGELIST}{healthy.pk}/change/"),
        staff_client.get(f"{CHANGELIST}{flagged.pk}/change/"),
        staff_client.get(CONNECT),
        staff_client.get(f"{CONNECT}?mailbox={flagged.pk}"),
    ):
        assert page.status_code == 200
        for mailbox in (healthy, flagged):
            assert_no_token(page, mailbox.access_token, mailbox.refresh_token)


def test_change_form_is_read_only_without_token_fields(staff_client, oauth2_server):
    mailbox = make_mailbox(oauth2_server, fresh=True)

    response = staff_client.get(f"{CHANGELIST}{mailbox.pk}/change/")

    body = response.content.decode()
    assert "refresh_token" not in body and 'access_token"' not in body
    assert 'name="_save"' not in body  # nothing to save: every field is read-only
    form = body.split('id="mailbox_form"')[1].split("</form>")[0]
    editable = set(re.findall(r'<(?:input|select|textarea)[^>]*name="([^"]+)"', form))
    assert editable <= {"csrfmiddlewaretoken"}
    assert f'href="{CONNECT}?mailbox={mailbox.pk}"' in body  # Reconnect


def test_search_and_filters(staff_client, oauth2_server):
    make_mailbox(oauth2_server, "one@example.com")
    flagged = make_mailbox(oauth2_server, "two@example.com")
    Mailbox.objects.filter(pk=flagged.pk).update(status=MailboxStatus.RECONNECT_REQUIRED)

    searched = staff_client.get(CHANGELIST, {"q": "one@"}).content.decode()
    filtered = staff_client.get(
        CHANGELIST, {"status__exact": "reconnect_required"}
    ).content.decode()

    assert "one@example.com" in searched and "two@example.com" not in searched
    assert "two@example.com" in filtered and "one@example.com" not in filtered


def test_connect_page_offers_configured_providers_and_the_redirect_uri(staff_client):
    response = staff_client.get(CONNECT)

    body = response.content.decode()
    assert '<option value="oauth2"' in body
    assert 'value="google"' not in body and 'value="microsoft"' not in body
    assert f'<code id="xoauth2-redirect-uri" style="user-select:all">{REDIRECT_URI}</code>' in body


def test_unconfigured_provider_is_refused(staff_client):
    response = staff_client.post(CONNECT, {"provider": "google", "email": ""})

    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    assert SESSION_KEY not in staff_client.session


# The consent flow ---------------------------------------------------------------


def test_connect_flow_creates_a_connected_mailbox_with_working_tokens(
    staff_client, oauth2_server, staff
):
    authorization_url = start_flow(staff_client)
    parts = urlsplit(authorization_url)
    query = parse_qs(parts.query)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == oauth2_server.authorization_url
    assert query["code_challenge_method"] == ["S256"] and query["redirect_uri"] == [REDIRECT_URI]
    assert "login_hint" not in query

    response = staff_client.get(answer_consent(authorization_url, email=SENDER), follow=True)

    mailbox = Mailbox.objects.get()
    assert response.redirect_chain == [(f"{CHANGELIST}{mailbox.pk}/change/", 302)]
    assert any(text.startswith(f"Connected {SENDER}: ") for text in messages_of(response))
    assert (mailbox.email, mailbox.provider, mailbox.status) == (
        SENDER,
        "oauth2",
        MailboxStatus.CONNECTED,
    )
    assert oauth2_server.validate_access_token(SENDER, mailbox.access_token)
    # The refresh token works too: a forced refresh yields another valid token.
    first_token = mailbox.access_token
    refreshed = tokens.get_access_token(mailbox, rejected_token=first_token)
    assert refreshed != first_token and oauth2_server.validate_access_token(SENDER, refreshed)
    assert LogEntry.objects.get().user_id == staff.pk
    assert_no_token(response, mailbox.access_token, mailbox.refresh_token)


def test_two_tabs_can_run_flows_at_once(staff_client):
    first = start_flow(staff_client, "first@example.com")
    second = start_flow(staff_client, "second@example.com")

    staff_client.get(answer_consent(second, email=None))
    staff_client.get(answer_consent(first, email=None))

    assert sorted(Mailbox.objects.values_list("email", "status")) == [
        ("first@example.com", "connected"),
        ("second@example.com", "connected"),
    ]


def test_reconnect_clears_reconnect_required(staff_client, oauth2_server):
    mailbox = make_mailbox(oauth2_server)
    mailbox.status = MailboxStatus.RECONNECT_REQUIRED
    mailbox.last_error = "invalid_grant: revoked"
    mailbox.last_error_at = timezone.now()
    mailbox.save()

    page = staff_client.get(f"{CONNECT}?mailbox={mailbox.pk}").content.decode()
    assert '<option value="oauth2" selected>' in page
    assert f'value="{SENDER}"' in page
    authorization_url = start_flow(staff_client, SENDER)
    assert parse_qs(urlsplit(authorization_url).query)["login_hint"] == [SENDER]
    response = staff_client.get(answer_consent(authorization_url, email=None), follow=True)

    mailbox.refresh_from_db()
    assert Mailbox.objects.count() == 1
    assert mailbox.status == MailboxStatus.CONNECTED
    assert mailbox.last_error == "" and mailbox.last_error_at is None
    assert oauth2_server.validate_access_token(SENDER, mailbox.access_token)
    assert any(text.startswith(f"Reconnected {SENDER}: ") for text in messages_of(response))


def test_denied_consent_saves_nothing(staff_client, oauth2_server):
    callback_url = answer_consent(start_flow(staff_client), email=SENDER, decision="deny")

    response = staff_client.get(callback_url, follow=True)

    assert response.redirect_chain == [(CHANGELIST, 302)]
    (text,) = messages_of(response)
    assert "Consent was refused at the provider (access_denied)" in text
    assert "click “Connect mailbox” again" in text
    assert not Mailbox.objects.exists() and oauth2_server.token_request_count == 0


def test_callback_without_state_is_rejected(staff_client, oauth2_server):
    start_flow(staff_client)

    response = staff_client.get(CALLBACK, {"code": "anything"}, follow=True)

    (text,) = messages_of(response)
    assert "carries no state" in text and "Nothing was saved" in text
    assert not Mailbox.objects.exists() and oauth2_server.token_request_count == 0


def test_reused_state_is_rejected(staff_client, oauth2_server):
    callback_url = answer_consent(start_flow(staff_client), email=SENDER)
    staff_client.get(callback_url, follow=True)  # used once, its message shown
    token_before = Mailbox.objects.get().access_token
    calls_before = oauth2_server.token_request_count

    response = staff_client.get(callback_url, follow=True)

    (text,) = messages_of(response)
    assert "state mismatch" in text
    assert oauth2_server.token_request_count == calls_before
    assert Mailbox.objects.get().access_token == token_before


def test_state_started_by_another_user_is_rejected(staff_client, oauth2_server, django_user_model):
    other = Client()
    other.force_login(make_staff(django_user_model, "other", "view_mailbox", "change_mailbox"))
    callback_url = answer_consent(start_flow(staff_client), email=SENDER)

    response = other.get(callback_url, follow=True)

    assert "state mismatch" in messages_of(response)[0]
    assert not Mailbox.objects.exists() and oauth2_server.token_request_count == 0
    # The other user's attempt did not spend the flow of the one who started it.
    staff_client.get(callback_url)
    assert Mailbox.objects.get().status == MailboxStatus.CONNECTED


def test_flow_recorded_for_another_user_is_rejected(staff_client, django_user_model):
    callback_url = answer_consent(start_flow(staff_client), email=SENDER)
    other = Client()
    other.force_login(make_staff(django_user_model, "other", "view_mailbox", "change_mailbox"))
    # Plant the first user's pending flow in the other user's session.
    session = other.session
    session[SESSION_KEY] = staff_client.session[SESSION_KEY]
    session.save()

    response = other.get(callback_url, follow=True)

    assert "state mismatch" in messages_of(response)[0]
    assert not Mailbox.objects.exists()


def test_expired_flow_is_rejected(staff_client):
    callback_url = answer_consent(start_flow(staff_client), email=SENDER)
    session = staff_client.session
    flows = session[SESSION_KEY]
    for flow in flows.values():
        flow["started_at"] -= 16 * 60
    session[SESSION_KEY] = flows
    session.save()

    response = staff_client.get(callback_url, follow=True)

    assert "has expired" in messages_of(response)[0]
    assert not Mailbox.objects.exists()


def test_consent_by_another_account_than_asked_saves_nothing(staff_client):
    response = connect(staff_client, ask="asked@example.com", consent_as="other@example.com")

    (text,) = messages_of(response)
    assert "You asked to connect asked@example.com" in text and "other@example.com" in text
    assert not Mailbox.objects.exists()


def state_of(authorization_url: str) -> str:
    return parse_qs(urlsplit(authorization_url).query)["state"][0]


def test_provider_error_is_reported(staff_client):
    state = state_of(start_flow(staff_client))

    response = staff_client.get(
        CALLBACK,
        {"state": state, "error": "invalid_scope", "error_description": "Unknown scope x"},
        follow=True,
    )

    (text,) = messages_of(response)
    assert "The provider ended the consent with an error (invalid_scope: Unknown scope x)" in text
    assert not Mailbox.objects.exists()


def test_refused_authorization_code_is_reported(staff_client, oauth2_server):
    state = state_of(start_flow(staff_client))

    response = staff_client.get(CALLBACK, {"state": state, "code": "made-up"}, follow=True)

    (text,) = messages_of(response)
    assert text.startswith("The provider did not accept the authorization code (")
    assert REDIRECT_URI in text
    assert oauth2_server.token_request_count == 1 and not Mailbox.objects.exists()


def test_provider_without_authorization_url_is_reported(staff_client, provider_settings):
    del provider_settings["PROVIDERS"]["oauth2"]["AUTHORIZATION_URL"]

    response = staff_client.post(CONNECT, {"provider": "oauth2", "email": ""})

    assert response.status_code == 200
    (text,) = messages_of(response)
    assert "has no authorization URL" in text and "AUTHORIZATION_URL" in text
    assert SESSION_KEY not in staff_client.session


def test_connect_page_without_providers_says_what_to_do(staff_client, settings):
    settings.XOAUTH2_MAIL = {"PROVIDERS": {}}

    body = staff_client.get(CONNECT).content.decode()

    assert "No provider that can ask for consent in the browser is configured" in body
    assert "<select" not in body


# Permissions ------------------------------------------------------------------


def test_staff_without_change_permission_gets_403(
    provider_settings, oauth2_server, django_user_model
):
    mailbox = make_mailbox(oauth2_server, fresh=True)
    client = Client()
    client.force_login(make_staff(django_user_model, "viewer", "view_mailbox"))

    changelist = client.get(CHANGELIST)
    assert changelist.status_code == 200
    assert f'href="{CONNECT}' not in changelist.content.decode()
    assert client.get(CONNECT).status_code == 403
    assert client.post(CONNECT, {"provider": "oauth2"}).status_code == 403
    assert client.get(CALLBACK, {"state": "s", "code": "c"}).status_code == 403
    for action in ("send_test_email", "refresh_access_token_now", "disconnect_mailboxes"):
        run_action(client, action, mailbox, post="yes")
    mailbox.refresh_from_db()
    assert mailbox.status == MailboxStatus.CONNECTED and mailbox.access_token
    assert oauth2_server.token_request_count == 0


def test_non_staff_is_sent_to_the_login_page(provider_settings, django_user_model):
    client = Client()
    client.force_login(django_user_model.objects.create_user("user", "u@example.org", "pw"))

    response = client.get(CONNECT)

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


# Actions -------------------------------------------------------------------------


@pytest.mark.parametrize("smtp_sasl_mechanisms", [("XOAUTH2",), ("OAUTHBEARER",)])
def test_send_test_email_action_delivers(
    smtp_sasl_mechanisms, staff_client, oauth2_server, xoauth2_smtp_server
):
    mailbox = make_mailbox(oauth2_server)

    response = run_action(staff_client, "send_test_email", mailbox)

    (text,) = messages_of(response)
    mechanism = smtp_sasl_mechanisms[0]  # named as used
    assert text == (
        f"Sent a test email from {SENDER} to {STAFF_EMAIL} over SMTP with {mechanism}; "
        "check that it arrived."
    )
    (received,) = xoauth2_smtp_server.messages
    assert (received.mail_from, received.rcpt_tos) == (SENDER, [STAFF_EMAIL])
    assert received.auth_user == SENDER
    assert email.message_from_bytes(received.data)["Subject"] == f"Test email from {SENDER}"


def test_send_test_email_reports_each_failure(staff_client, oauth2_server, xoauth2_smtp_server):
    good = make_mailbox(oauth2_server, "good@example.com")
    bad = make_mailbox(oauth2_server, "bad@example.com")
    Mailbox.objects.filter(pk=bad.pk).update(status=MailboxStatus.RECONNECT_REQUIRED)

    texts = messages_of(run_action(staff_client, "send_test_email", good, bad))

    assert any(t.startswith("The test email from bad@example.com was not sent: ") for t in texts)
    assert any("must be reconnected" in t for t in texts)
    assert any(t.startswith("Sent a test email from good@example.com") for t in texts)
    assert [m.mail_from for m in xoauth2_smtp_server.messages] == ["good@example.com"]


def test_send_test_email_needs_the_users_address(
    provider_settings, oauth2_server, django_user_model, xoauth2_smtp_server
):
    mailbox = make_mailbox(oauth2_server)
    client = Client()
    client.force_login(
        make_staff(django_user_model, "noaddress", "view_mailbox", "change_mailbox", email="")
    )

    (text,) = messages_of(run_action(client, "send_test_email", mailbox))

    assert "Your user account has no email address" in text
    assert xoauth2_smtp_server.messages == []


def test_refresh_now_calls_the_token_endpoint(staff_client, oauth2_server):
    mailbox = make_mailbox(oauth2_server, fresh=True)
    assert mailbox.access_token_is_fresh(300)
    before = oauth2_server.token_request_count

    response = run_action(staff_client, "refresh_access_token_now", mailbox)

    assert oauth2_server.token_request_count == before + 1
    old_token = mailbox.access_token
    mailbox.refresh_from_db()
    assert mailbox.access_token != old_token
    assert oauth2_server.validate_access_token(SENDER, mailbox.access_token)
    assert messages_of(response)[0].startswith(f"Refreshed the access token of {SENDER}")


def test_refresh_now_reports_a_revoked_grant(staff_client, oauth2_server):
    mailbox = make_mailbox(oauth2_server, fresh=True)
    oauth2_server.revoke(mailbox.refresh_token)

    (text,) = messages_of(run_action(staff_client, "refresh_access_token_now", mailbox))

    assert "must be reconnected" in text
    assert Mailbox.objects.get().status == MailboxStatus.RECONNECT_REQUIRED


def test_disconnect_confirms_then_wipes_and_revokes(staff_client, oauth2_server):
    mailbox = make_mailbox(oauth2_server, fresh=True)
    access_token, refresh_token = mailbox.access_token, mailbox.refresh_token

    confirmation = run_action(staff_client, "disconnect_mailboxes", mailbox)

    assert confirmation.status_code == 200
    assert "Yes, disconnect" in confirmation.content.decode()
    assert_no_token(confirmation, access_token, refresh_token)
    assert Mailbox.objects.get().access_token == access_token  # nothing done yet

    response = run_action(staff_client, "disconnect_mailboxes", mailbox, post="yes")

    mailbox.refresh_from_db()
    assert (mailbox.status, mailbox.access_token, mailbox.refresh_token) == (
        MailboxStatus.DISCONNECTED,
        None,
        None,
    )
    assert mailbox.access_token_expires_at is None
    assert not oauth2_server.validate_access_token(SENDER, access_token)
    (text,) = messages_of(response)
    assert text == f"Disconnected {SENDER}: its tokens are wiped and the provider revoked them."
    assert Mailbox.objects.filter(access_token__isnull=True).count() == 1


def test_disconnect_without_revocation_endpoint_says_so(
    staff_client, oauth2_server, provider_settings
):
    del provider_settings["PROVIDERS"]["oauth2"]["REVOCATION_URL"]
    mailbox = make_mailbox(oauth2_server, fresh=True)

    response = run_action(staff_client, "disconnect_mailboxes", mailbox, post="yes")

    (text,) = messages_of(response)
    assert "the provider did not revoke the grant" in text
    assert "remove this application's access" in text
    assert Mailbox.objects.get().status == MailboxStatus.DISCONNECTED
    # Still valid at the provider (nothing revoked), but unknown to the site now.
    assert oauth2_server.validate_access_token(SENDER, mailbox.access_token)


def test_expiry_column_shows_the_token_expiry(staff_client, oauth2_server):
    mailbox = make_mailbox(oauth2_server)
    Mailbox.objects.filter(pk=mailbox.pk).update(
        access_token_expires_at=dt.datetime(2031, 5, 17, 10, 30, tzinfo=dt.UTC)
    )

    body = staff_client.get(CHANGELIST).content.decode()

    assert "May 17, 2031" in body
