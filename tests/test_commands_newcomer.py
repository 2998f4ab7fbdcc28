"""The management commands on a newcomer's mistakes: each problem named with its fix."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command

from django_xoauth2_mail.models import Mailbox, MailboxStatus
from tests.conftest import SENDER, make_mailbox

pytestmark = pytest.mark.usefixtures("transactional_db")


def command_output(name: str, *args: str) -> tuple[str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    call_command(name, *args, stdout=stdout, stderr=stderr)
    return stdout.getvalue(), stderr.getvalue()


# list_mailboxes ------------------------------------------------------------------------


def test_list_mailboxes_says_what_cannot_send_and_the_fix(
    settings, real_backend, oauth2_settings, oauth2_server
):
    settings.SERVER_EMAIL = "root@localhost"  # Django's default
    settings.DEFAULT_FROM_EMAIL = SENDER
    make_mailbox(oauth2_server, fresh=True)
    Mailbox.objects.create(email="old@example.com", provider="google")
    Mailbox.objects.create(
        email="alerts@example.com", provider="oauth2", status=MailboxStatus.RECONNECT_REQUIRED
    )

    _, stderr = command_output("list_mailboxes")

    assert stderr.splitlines() == [
        "1 mailbox(es) must be reconnected before they can send:",
        "  python manage.py connect_mailbox oauth2 --email alerts@example.com",
        "The provider 'google' of old@example.com is not in XOAUTH2_MAIL['PROVIDERS']: they "
        "cannot send until it is configured.",
        "No mailbox can send from SERVER_EMAIL (root@localhost), so mail_admins(), "
        "mail_managers() and error reports will fail: set SERVER_EMAIL to a connected "
        "mailbox's address, or connect root@localhost.",
    ]


def test_list_mailboxes_accepts_the_fallback_mailbox(
    settings, real_backend, oauth2_settings, oauth2_server
):
    settings.SERVER_EMAIL = "Site <root@localhost>"
    oauth2_settings["DEFAULT_MAILBOX"] = SENDER
    make_mailbox(oauth2_server, fresh=True)
    assert command_output("list_mailboxes")[1] == ""
