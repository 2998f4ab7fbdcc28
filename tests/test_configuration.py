"""Both ways of configuring the backend: EMAIL_BACKEND (5.2) and MAILERS (6.1)."""

from __future__ import annotations

import django
import pytest
from django.core import mail

from django_xoauth2_mail.backends import EmailBackend
from django_xoauth2_mail.exceptions import ConfigurationError
from tests.conftest import OUR_BACKEND, SENDER

pytestmark = pytest.mark.django_db(transaction=True)

needs_mailers = pytest.mark.skipif(django.VERSION < (6, 1), reason="MAILERS is new in Django 6.1")
before_mailers = pytest.mark.skipif(django.VERSION >= (6, 1), reason="Django < 6.1 only")


@before_mailers
def test_email_backend_setting_with_keyword_options(mailbox, xoauth2_smtp_server):
    connection = mail.get_connection(mailbox=SENDER, timeout=7)
    assert isinstance(connection, EmailBackend)
    assert connection.timeout == 7.0
    assert mail.send_mail("Hi", "B", "alias@example.com", ["a@example.org"], connection=connection)
    assert xoauth2_smtp_server.messages[0].auth_user == SENDER


@before_mailers
def test_unknown_option_is_refused_before_django_61():
    with pytest.raises(ConfigurationError, match="'mailboxx'"):
        EmailBackend(mailboxx=SENDER)


@needs_mailers
def test_mailers_alias_with_using(settings, mailbox, xoauth2_smtp_server):
    settings.MAILERS = {
        "default": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"},
        "transactional": {"BACKEND": OUR_BACKEND, "OPTIONS": {"mailbox": SENDER, "timeout": 9}},
    }

    sent = mail.send_mail("Hi", "B", "alias@example.com", ["a@example.org"], using="transactional")

    assert sent == 1
    assert xoauth2_smtp_server.messages[0].auth_user == SENDER
    assert mail.outbox == []  # the default alias was not used
    assert getattr(mail.mailers["transactional"], "alias", None) == "transactional"


@needs_mailers
def test_mailers_reject_unknown_options_like_djangos_backends(settings):
    from django.core.mail import InvalidMailer

    settings.MAILERS = {"default": {"BACKEND": OUR_BACKEND, "OPTIONS": {"mailboxx": SENDER}}}
    with pytest.raises(InvalidMailer, match="mailboxx"):
        mail.mailers["default"]


def test_password_option_is_refused():
    with pytest.raises(ConfigurationError, match="takes no password"):
        EmailBackend(password="hunter2")
