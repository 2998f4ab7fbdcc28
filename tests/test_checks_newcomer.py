"""System checks for a newcomer's common mistakes (xoauth2_mail.W020-W029, E020-E029),
one test per id, plus the provider settings schema against the documentation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import run_checks

from django_xoauth2_mail.checks import check_settings
from django_xoauth2_mail.models import Mailbox
from django_xoauth2_mail.providers import PROVIDER_CLASSES, PROVIDER_SETTINGS

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
    assert [m.id for m in run_checks(tags=["database"])] == []  # plain `check`: no database
    found = [m for m in run_checks(databases=["default"]) if str(m.id).startswith("xoauth2_mail.W")]
    assert [m.id for m in found] == ["xoauth2_mail.W023"]
    assert found[0].msg == (
        "2 mailbox(es) use the provider 'oauth2', which is not in XOAUTH2_MAIL['PROVIDERS']: "
        "a@example.com, b@example.com cannot send."
    )
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"oauth2": {}}}
    assert not [m for m in run_checks(databases=["default"]) if m.id == "xoauth2_mail.W023"]
