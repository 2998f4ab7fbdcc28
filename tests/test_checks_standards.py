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


@pytest.mark.parametrize(
    "issuer",
    [
        "https://id.example.com/realms/mail",
        "https://id.example.com",
        "http://127.0.0.1:8765",  # a development server on loopback
    ],
)
def test_issuer_alone_is_a_complete_oauth2_configuration(settings, issuer):
    values = {"CLIENT_ID": "id", "ISSUER": issuer, "SMTP_HOST": "smtp.example"}
    assert ids_for(settings, {"oauth2": values}) == []


@pytest.mark.parametrize(
    "issuer",
    [
        "http://id.example.com/realms/mail",  # tokens would follow plain-HTTP metadata
        "https://id.example.com/?realm=mail",
        "https://id.example.com/#x",
        "id.example.com",
        42,
    ],
)
def test_e041_issuer_must_be_an_https_url_without_query_or_fragment(settings, issuer):
    values = {"CLIENT_ID": "id", "ISSUER": issuer, "SMTP_HOST": "smtp.example"}
    messages = messages_for(settings, {"oauth2": values})
    assert [m.id for m in messages] == ["xoauth2_mail.E041"]
    assert "RFC 8414" in messages[0].msg


def test_e042_issuer_on_a_provider_that_does_not_read_it(settings):
    assert ids_for(settings, {"dev": {"ISSUER": "http://127.0.0.1:8765"}}) == ["xoauth2_mail.E042"]
    values = {"CLIENT_ID": "id", "CLIENT_SECRET": "s", "ISSUER": "https://accounts.google.com"}
    assert ids_for(settings, {"google": values}) == ["xoauth2_mail.E042"]


def test_e043_oauth2_needs_issuer_or_token_url(settings):
    messages = messages_for(settings, {"oauth2": {"CLIENT_ID": "id", "SMTP_HOST": "smtp.x"}})
    assert [m.id for m in messages] == ["xoauth2_mail.E043"]
    assert "ISSUER" in messages[0].msg and "TOKEN_URL" in messages[0].msg


@pytest.mark.parametrize("value", [0, -5, "3600", True])
def test_e044_discovery_cache_seconds_must_be_positive(settings, value):
    settings.XOAUTH2_MAIL = {"PROVIDERS": {}, "DISCOVERY_CACHE_SECONDS": value}
    assert [m.id for m in [*check_settings(), *check_standards_settings()]] == ["xoauth2_mail.E044"]


def test_checks_make_no_network_call(settings, monkeypatch):
    import requests

    def refuse(*args, **kwargs):
        raise AssertionError("a system check used the network")

    monkeypatch.setattr(requests.Session, "request", refuse)
    values = {"CLIENT_ID": "id", "ISSUER": "https://id.example.com", "SMTP_HOST": "s"}
    assert ids_for(settings, {"oauth2": values}) == []
