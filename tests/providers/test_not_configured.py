"""A mailbox whose provider is missing from XOAUTH2_MAIL['PROVIDERS'] (a typo, or an
empty dict) fails at once with a message naming it: no request goes anywhere, and the
mailbox's stored state is left alone."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.mail import send_mail

from django_xoauth2_mail import tokens
from django_xoauth2_mail.exceptions import ConfigurationError
from django_xoauth2_mail.models import Mailbox
from tests.conftest import SENDER, make_mailbox

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def typo_in_providers(mailbox: Mailbox, oauth2_settings: dict[str, Any]) -> Mailbox:
    """The mailbox uses 'oauth2', but the settings spell it 'oauth_2'."""
    oauth2_settings["PROVIDERS"] = {"oauth_2": oauth2_settings["PROVIDERS"]["oauth2"]}
    return mailbox


def test_the_token_layer_names_mailbox_and_provider(typo_in_providers, oauth2_server):
    with pytest.raises(ConfigurationError) as caught:
        tokens.get_access_token(typo_in_providers)
    assert str(caught.value).startswith(
        f"The mailbox {SENDER} uses the provider 'oauth2', which is not in "
        "XOAUTH2_MAIL['PROVIDERS'] (configured: none). Add it to your settings"
    )
    assert oauth2_server.token_request_count == 0
    assert Mailbox.objects.get().last_error == ""  # a setting to fix, not a mailbox fault


def test_sending_fails_before_any_request(typo_in_providers, oauth2_server, xoauth2_smtp_server):
    with pytest.raises(ConfigurationError, match="'oauth2'.* not in XOAUTH2_MAIL"):
        send_mail("Hi", "Body", SENDER, ["to@example.com"], fail_silently=True)
    assert oauth2_server.token_request_count == 0
    assert xoauth2_smtp_server.messages == []
    assert Mailbox.objects.get().last_error == ""


def test_an_empty_providers_dict_does_not_fall_back_on_the_dev_server(
    settings, transactional_db, real_backend, oauth2_server
):
    settings.XOAUTH2_MAIL = {"PROVIDERS": {}}
    mailbox = make_mailbox(oauth2_server, "demo@example.com")
    Mailbox.objects.filter(pk=mailbox.pk).update(provider="dev")
    with pytest.raises(ConfigurationError) as caught:
        send_mail("Hi", "Body", "demo@example.com", ["to@example.com"])
    message = str(caught.value)
    assert "demo@example.com uses the provider 'dev', which is not in" in message
    assert 'XOAUTH2_MAIL = {"PROVIDERS": {"dev": {}}}' in message
    assert "python manage.py xoauth2_devserver" in message
    assert "try again later" not in message
