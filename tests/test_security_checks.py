"""The security system checks: TLS settings, DEBUG with real providers, the dev provider
in production. One test (or more) per check id."""

from __future__ import annotations

from typing import Any

import pytest

from django_xoauth2_mail.checks import check_security, check_settings

GOOD_OAUTH2 = {
    "CLIENT_ID": "id",
    "CLIENT_SECRET": "secret",
    "TOKEN_URL": "https://auth.example/token",
    "SMTP_HOST": "smtp.example",
}


def ids_for(settings: Any, value: Any) -> list[str]:
    settings.XOAUTH2_MAIL = value
    return sorted(str(message.id) for message in [*check_settings(), *check_security()])


@pytest.mark.parametrize("security", ["STARTTLS", " tls", "starttls\n"])
def test_smtp_security_in_another_case_or_with_blanks_is_accepted(settings, security):
    oauth2 = {**GOOD_OAUTH2, "SMTP_SECURITY": security}
    assert ids_for(settings, {"PROVIDERS": {"oauth2": oauth2}}) == []


@pytest.mark.parametrize("security", ["ssl", "starttls?", 1])
def test_an_unknown_smtp_security_is_e011(settings, security):
    oauth2 = {**GOOD_OAUTH2, "SMTP_SECURITY": security}
    assert ids_for(settings, {"PROVIDERS": {"oauth2": oauth2}}) == ["xoauth2_mail.E011"]


def test_none_in_capitals_towards_a_remote_host_is_still_e015(settings):
    oauth2 = {**GOOD_OAUTH2, "SMTP_SECURITY": " NONE"}
    assert ids_for(settings, {"PROVIDERS": {"oauth2": oauth2}}) == ["xoauth2_mail.E015"]
