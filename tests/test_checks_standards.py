"""The checks of SASL_MECHANISM and ISSUER (xoauth2_mail.E040-E049): one test per id.
They read the settings only: no network."""

from __future__ import annotations

from typing import Any

import pytest

from django_xoauth2_mail.checks import check_settings, check_standards_settings

GOOD_OAUTH2 = {
    "CLIENT_ID": "id",
    "CLIENT_SECRET": "secret",
    "TOKEN_URL": "https://auth.example/token",
    "SMTP_HOST": "smtp.example",
}


def messages_for(settings: Any, providers: dict[str, Any]) -> list[Any]:
    settings.XOAUTH2_MAIL = {"PROVIDERS": providers}
    return [*check_settings(), *check_standards_settings()]


def ids_for(settings: Any, providers: dict[str, Any]) -> list[str]:
    return sorted(str(message.id) for message in messages_for(settings, providers))


@pytest.mark.parametrize("value", ["auto", "XOAUTH2", "OAUTHBEARER"])
def test_sasl_mechanism_values_pass_for_every_provider(settings, value):
    providers = {
        "oauth2": {**GOOD_OAUTH2, "SASL_MECHANISM": value},
        "google": {"CLIENT_ID": "id", "CLIENT_SECRET": "s", "SASL_MECHANISM": value},
        "dev": {"SASL_MECHANISM": value},
    }
    assert ids_for(settings, providers) == []


@pytest.mark.parametrize("value", ["oauthbearer", "PLAIN", 1, ""])
def test_e040_sasl_mechanism_must_be_a_known_value(settings, value):
    messages = messages_for(settings, {"oauth2": {**GOOD_OAUTH2, "SASL_MECHANISM": value}})
    assert [m.id for m in messages] == ["xoauth2_mail.E040"]
    assert "'OAUTHBEARER'" in messages[0].hint
