"""System checks for a newcomer's common mistakes (xoauth2_mail.W020-W029, E020-E029),
one test per id, plus the provider settings schema against the documentation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import django
import pytest
from django.core.checks import run_checks

from django_xoauth2_mail.checks import check_settings
from django_xoauth2_mail.models import Mailbox
from django_xoauth2_mail.providers import PROVIDER_CLASSES, PROVIDER_SETTINGS
from django_xoauth2_mail.setup_checks import check_mailers, check_site_addresses

DOCS = Path(__file__).resolve().parent.parent / "docs"


def messages_for(settings: Any, value: Any) -> dict[str, str]:
    settings.XOAUTH2_MAIL = value
    return {str(m.id): f"{m.msg} {m.hint}" for m in check_settings()}


# W020: a key of another provider (item 17) ------------------------------------------------


def test_w020_a_microsoft_key_under_google(settings):
    found = messages_for(
        settings,
        {"PROVIDERS": {"google": {"CLIENT_ID": "i", "CLIENT_SECRET": "s", "TENANT": "contoso"}}},
    )
    assert list(found) == ["xoauth2_mail.W020"]
    assert found["xoauth2_mail.W020"].startswith(
        "XOAUTH2_MAIL['PROVIDERS']['google'] has 'TENANT', a setting of microsoft that google "
        "does not read; it is ignored. Move it under 'microsoft', or remove it."
    )


def test_w020_and_w002_tell_a_misplaced_key_from_a_typo(settings):
    found = messages_for(settings, {"PROVIDERS": {"dev": {"SERVICE_ACCOUNT_FILE": "k.json"}}})
    assert list(found) == ["xoauth2_mail.W020"]
    found = messages_for(settings, {"PROVIDERS": {"dev": {"BASE_URLL": "http://127.0.0.1:1"}}})
    assert list(found) == ["xoauth2_mail.W002"]
    assert "BASE_URL" in found["xoauth2_mail.W002"]  # the hint lists dev's own keys


def test_every_key_a_provider_reads_passes(settings):
    for provider_id, keys in PROVIDER_SETTINGS.items():
        value = dict.fromkeys(keys)
        found = messages_for(settings, {"PROVIDERS": {provider_id: value}})
        assert not [i for i in found if i.startswith("xoauth2_mail.W")], (provider_id, found)


def test_the_settings_page_documents_which_provider_reads_which_key():
    """docs/settings.rst's table is the schema in providers/__init__.py, written out."""
    assert set(PROVIDER_SETTINGS) == set(PROVIDER_CLASSES)
    text = (DOCS / "settings.rst").read_text()
    table = text[text.index(".. provider-keys-start") : text.index(".. provider-keys-end")]
    header = re.search(r"^key\s+(.+)$", table, re.MULTILINE)
    assert header is not None
    columns = header.group(1).split()
    documented: dict[str, set[str]] = {provider_id: set() for provider_id in columns}
    for line in table.splitlines():
        match = re.match(r"^``([A-Z_]+)``\s+(.+)$", line)
        if match:
            marks = match.group(2).split()
            for provider_id, mark in zip(columns, marks, strict=True):
                if mark == "x":
                    documented[provider_id].add(match.group(1))
    assert documented == {pid: set(keys) for pid, keys in PROVIDER_SETTINGS.items()}


def test_w020_is_reported_by_manage_py_check(settings):
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"dev": {"APP_ONLY": True}}}
    assert "xoauth2_mail.W020" in [m.id for m in run_checks()]


# W023: mailboxes whose provider is not configured (item 2) --------------------------------


@pytest.mark.django_db
def test_w023_mailboxes_whose_provider_is_not_configured(settings):
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"oauth_2": {}}}  # a typo of oauth2
    Mailbox.objects.create(email="a@example.com", provider="oauth2")
    Mailbox.objects.create(email="b@example.com", provider="oauth2")
    assert "xoauth2_mail.W023" not in [m.id for m in run_checks()]  # plain `check`: no database
    found = [m for m in run_checks(databases=["default"]) if str(m.id).startswith("xoauth2_mail.W")]
    assert [m.id for m in found] == ["xoauth2_mail.W023"]
    assert found[0].msg == (
        "2 mailbox(es) use the provider 'oauth2', which is not in XOAUTH2_MAIL['PROVIDERS']: "
        "a@example.com, b@example.com cannot send."
    )
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"oauth2": {}}}
    assert not [m for m in run_checks(databases=["default"]) if m.id == "xoauth2_mail.W023"]


# W021, W022: Django's default sending addresses, no fallback mailbox (item 1) -------------

OUR_BACKEND = "django_xoauth2_mail.backends.EmailBackend"


def site_ids(settings: Any) -> list[str]:
    return sorted(str(m.id) for m in check_site_addresses())


def use_our_backend(settings: Any) -> None:
    if django.VERSION >= (6, 1):  # Django 6.1 refuses EMAIL_BACKEND next to MAILERS
        settings.MAILERS = {"default": {"BACKEND": OUR_BACKEND}}
    else:
        settings.EMAIL_BACKEND = OUR_BACKEND


def test_w021_w022_django_default_addresses(settings):
    use_our_backend(settings)
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"dev": {}}}
    settings.SERVER_EMAIL, settings.DEFAULT_FROM_EMAIL = "root@localhost", "webmaster@localhost"
    found = {str(m.id): m for m in check_site_addresses()}
    assert sorted(found) == ["xoauth2_mail.W021", "xoauth2_mail.W022"]
    assert found["xoauth2_mail.W021"].msg == (
        "SERVER_EMAIL is Django's default, 'root@localhost': mail_admins(), mail_managers() "
        "and error reports are sent from it, and no mailbox can send as that address."
    )
    assert "password-reset email" in found["xoauth2_mail.W022"].msg
    assert 'DEFAULT_FROM_EMAIL = "noreply@example.com"' in str(found["xoauth2_mail.W022"].hint)
    assert "xoauth2_mail.W021" in [m.id for m in run_checks()]  # registered

    settings.SERVER_EMAIL = "noreply@example.com"
    assert site_ids(settings) == ["xoauth2_mail.W022"]


def test_w021_w022_not_with_a_fallback_mailbox_or_another_backend(settings):
    settings.SERVER_EMAIL, settings.DEFAULT_FROM_EMAIL = "root@localhost", "webmaster@localhost"
    use_our_backend(settings)
    settings.XOAUTH2_MAIL = {"DEFAULT_MAILBOX": "noreply@example.com"}
    assert site_ids(settings) == []
    settings.XOAUTH2_MAIL = {}
    if django.VERSION >= (6, 1):
        settings.MAILERS = {
            "default": {"BACKEND": OUR_BACKEND, "OPTIONS": {"mailbox": "noreply@example.com"}}
        }
        assert site_ids(settings) == []
        settings.MAILERS = {"default": {"BACKEND": "django.core.mail.backends.smtp.EmailBackend"}}
    else:
        settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    assert site_ids(settings) == []


# E020, E021: MAILERS options (item 5) ------------------------------------------------------


def test_e020_an_unknown_option_of_our_mailer(settings):
    settings.MAILERS = {
        "default": {"BACKEND": OUR_BACKEND, "OPTIONS": {"mail_box": "noreply@example.com"}},
        "other": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend", "OPTIONS": {"x": 1}},
        "bulk": {"BACKEND": OUR_BACKEND, "OPTIONS": {"mailbox": "bulk@example.com"}},
    }
    found = check_mailers()
    assert [(m.id, m.msg) for m in found] == [
        (
            "xoauth2_mail.E020",
            "MAILERS['default']['OPTIONS'] has 'mail_box', which EmailBackend does not take: "
            "the first send through 'default' would fail.",
        )
    ]
    assert found[0].hint == (
        "Its options: fail_silently, keep_alive, mailbox, max_connections, rate_limit, timeout."
    )
    assert "xoauth2_mail.E020" in [m.id for m in run_checks()]


def test_e021_a_backend_path_that_does_not_exist(settings):
    settings.MAILERS = {"default": {"BACKEND": "django_xoauth2_mail.backends.EmailBackends"}}
    assert [m.id for m in check_mailers()] == ["xoauth2_mail.E021"]
