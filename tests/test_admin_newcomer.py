"""The Mailbox admin on a newcomer's site: what cannot send is said on the list of
mailboxes, messages read right, and the Connect page speaks of the providers configured."""

from __future__ import annotations

import html

import pytest

from django_xoauth2_mail.models import Mailbox
from tests.conftest import SENDER, make_mailbox
from tests.test_admin import (  # noqa: F401 (fixtures)
    CHANGELIST,
    provider_settings,
    staff,
    staff_client,
)

pytestmark = pytest.mark.django_db(transaction=True)


def page_text(response) -> str:
    return html.unescape(response.content.decode())


def test_change_list_names_mail_that_no_mailbox_sends(staff_client, settings, oauth2_server):  # noqa: F811
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
