"""The Mailbox admin on a newcomer's site: what cannot send is said on the list of
mailboxes, messages read right, and the Connect page speaks of the providers configured."""

from __future__ import annotations

import datetime as dt
import html

import pytest
from django.utils import timezone
from django.utils.formats import date_format

from django_xoauth2_mail.models import Mailbox
from tests import test_admin
from tests.conftest import SENDER, make_mailbox
from tests.test_admin import CHANGELIST

# The admin tests' fixtures: the oauth2 provider as a site sets it up, a staff client.
provider_settings = test_admin.provider_settings
staff = test_admin.staff
staff_client = test_admin.staff_client

pytestmark = pytest.mark.django_db(transaction=True)


def row_of(body: str, address: str) -> str:
    """The change list's table row of ``address``."""
    return next(row.split("</tr>")[0] for row in body.split("<tr")[1:] if address in row)


def page_text(response) -> str:
    return html.unescape(response.content.decode())


def test_change_list_names_mail_that_no_mailbox_sends(staff_client, settings, oauth2_server):
    settings.SERVER_EMAIL = "root@localhost"
    settings.DEFAULT_FROM_EMAIL = SENDER
    make_mailbox(oauth2_server, fresh=True)
    Mailbox.objects.create(email="old@example.com", provider="google")

    text = page_text(staff_client.get(CHANGELIST))

    assert (
        "No mailbox can send from SERVER_EMAIL (root@localhost), so mail_admins(), "
        "mail_managers() and error reports will fail" in text
    )
    assert "The provider 'google' of old@example.com is not in XOAUTH2_MAIL['PROVIDERS']" in text
    assert "DEFAULT_FROM_EMAIL" not in text  # SENDER is connected

    settings.SERVER_EMAIL = SENDER
    Mailbox.objects.filter(email="old@example.com").delete()
    assert "xoauth2-sending-problems" not in staff_client.get(CHANGELIST).content.decode()


def test_an_error_before_a_later_success_is_shown_as_earlier(staff_client, oauth2_server):
    now = timezone.now()
    current = make_mailbox(oauth2_server, "current@example.com")
    past = make_mailbox(oauth2_server, "past@example.com")
    Mailbox.objects.filter(pk__in=[current.pk, past.pk]).update(
        last_error="Could not refresh the access token: timeout.",
        last_error_at=now - dt.timedelta(minutes=10),
    )
    Mailbox.objects.filter(pk=past.pk).update(last_sent_at=now)

    body = staff_client.get(CHANGELIST).content.decode()

    past_row, current_row = row_of(body, "past@example.com"), row_of(body, "current@example.com")
    assert 'class="xoauth2-past-error"' in past_row and "Earlier (" in past_row
    assert "xoauth2-past-error" not in current_row
    assert "Could not refresh the access token: timeout." in current_row


# Admin polish (item 10) ----------------------------------------------------------------------


def test_refresh_message_has_one_period_after_the_time(staff_client, oauth2_server):
    mailbox = make_mailbox(oauth2_server, fresh=True)
    response = test_admin.run_action(staff_client, "refresh_access_token_now", mailbox)
    (message,) = test_admin.messages_of(response)
    mailbox.refresh_from_db()
    expires = date_format(timezone.localtime(mailbox.access_token_expires_at), "DATETIME_FORMAT")
    assert message == f"Refreshed the access token of {SENDER} (the new one expires {expires})."
    assert ".." not in message


def test_after_connect_the_test_email_is_one_click_away(
    staff_client, oauth2_server, xoauth2_smtp_server
):
    response = test_admin.connect(staff_client)
    (message,) = test_admin.messages_of(response)
    assert message.endswith("To check it, click “Send a test email” above.")
    body = response.content.decode()
    # The form around the button: it posts the list's action for this one mailbox.
    form = (
        body.split('class="xoauth2-test-email"')[0].rsplit("<form", 1)[1]
        + body.split('class="xoauth2-test-email"')[1].split("</form>")[0]
    )
    assert f'action="{CHANGELIST}"' in form and 'name="action" value="send_test_email"' in form
    mailbox = Mailbox.objects.get()
    sent = staff_client.post(
        CHANGELIST,
        {"action": "send_test_email", "_selected_action": mailbox.pk, "index": "0"},
        follow=True,
    )
    assert test_admin.messages_of(sent) == [
        f"Sent a test email from {SENDER} to {test_admin.STAFF_EMAIL} over SMTP with XOAUTH2; "
        "check that it arrived."
    ]
    assert len(xoauth2_smtp_server.wait_for_messages(1)) == 1


def test_the_test_email_button_only_for_a_connected_mailbox(staff_client, oauth2_server):
    mailbox = make_mailbox(oauth2_server)
    Mailbox.objects.filter(pk=mailbox.pk).update(status="reconnect_required")
    body = staff_client.get(f"{CHANGELIST}{mailbox.pk}/change/").content.decode()
    assert "xoauth2-test-email" not in body.split('id="content-main"')[1]


def test_connect_page_explains_only_the_configured_providers(staff_client, settings):
    body = page_text(staff_client.get(test_admin.CONNECT))
    assert "OAuth2 server (oauth2): the redirect URIs of your client" in body
    assert "Google" not in body and "Entra" not in body

    settings.XOAUTH2_MAIL["PROVIDERS"] |= {
        "google": {"CLIENT_ID": "id", "CLIENT_SECRET": "secret"},
        "dev": {},
    }
    body = page_text(staff_client.get(test_admin.CONNECT))
    assert "Google Cloud console > APIs & Services > Credentials" in body
    assert "Development server (dev): nothing to register" in body
    assert "Entra" not in body
