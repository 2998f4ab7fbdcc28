"""Errors a newcomer meets while sending, each naming the exact fix."""

from __future__ import annotations

import pytest
from django.core import mail

from django_xoauth2_mail import tokens
from django_xoauth2_mail.exceptions import MailboxDisconnected, MailboxReconnectRequired
from tests.conftest import SENDER

pytestmark = pytest.mark.django_db(transaction=True)

EXACT_COMMAND = f"`python manage.py connect_mailbox oauth2 --email {SENDER}`"


def test_reconnect_required_prints_the_exact_command(mailbox, oauth2_server):
    oauth2_server.revoke(mailbox.refresh_token)
    with pytest.raises(MailboxReconnectRequired) as first:
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])
    with pytest.raises(MailboxReconnectRequired) as later:  # the fast path, no refresh
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])
    for caught in (first, later):
        assert f"Fix it with {EXACT_COMMAND} or with the Reconnect button" in str(caught.value)
        assert "<provider>" not in str(caught.value)


def test_disconnected_prints_the_exact_command(mailbox):
    tokens.wipe_tokens(mailbox)
    with pytest.raises(MailboxDisconnected) as caught:
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])
    assert f"Connect it again with {EXACT_COMMAND} or in the Django admin" in str(caught.value)
