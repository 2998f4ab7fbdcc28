"""Every system check, by id: each misconfiguration is reported at start-up."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
from cryptography.fernet import Fernet

from django_xoauth2_mail.checks import (
    check_outbox,
    check_security,
    check_settings,
    check_standards_settings,
)

GOOD_OAUTH2 = {
    "CLIENT_ID": "id",
    "CLIENT_SECRET": "secret",
    "TOKEN_URL": "https://auth.example/token",
    "SMTP_HOST": "smtp.example",
}


def ids_for(settings: Any, value: Any) -> list[str]:
    settings.XOAUTH2_MAIL = value
    return sorted(str(message.id) for message in [*check_settings(), *check_security()])


def test_a_good_configuration_has_no_messages(settings):
    assert ids_for(settings, {"PROVIDERS": {"oauth2": GOOD_OAUTH2}}) == []


def test_no_setting_at_all_is_fine(settings):
    del settings.XOAUTH2_MAIL
    assert check_settings() == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["not", "a", "dict"], "xoauth2_mail.E001"),
        ({"SMTP_TIMEOUT": "30"}, "xoauth2_mail.E002"),
        ({"TOKEN_REFRESH_SKEW": -1}, "xoauth2_mail.E002"),
        ({"TOKEN_REFRESH_ATTEMPTS": 1.5}, "xoauth2_mail.E002"),
        ({"HTTP_TIMEOUT": True}, "xoauth2_mail.E002"),
        ({"DEFAULT_MAILBOX": "not-an-address"}, "xoauth2_mail.E003"),
        ({"ALLOW_INSECURE_SMTP": "yes"}, "xoauth2_mail.E004"),
        ({"SMTP_RETRY_DELAYS": 5}, "xoauth2_mail.E016"),
        ({"SMTP_RETRY_DELAYS": [1, -2]}, "xoauth2_mail.E016"),
        ({"PROVIDERS": ["google"]}, "xoauth2_mail.E005"),
        ({"ENCRYPTION_KEYS": ["not-a-fernet-key"]}, "xoauth2_mail.E006"),
        ({"ENCRYPTION_KEYS": 42}, "xoauth2_mail.E006"),
        ({"PROVIDERS": {"yahoo": {"CLIENT_ID": "x"}}}, "xoauth2_mail.E008"),
        ({"PROVIDERS": {"oauth2": "client-id"}}, "xoauth2_mail.E009"),
        ({"PROVIDERS": {"oauth2": {**GOOD_OAUTH2, "CLIENT_ID": ""}}}, "xoauth2_mail.E010"),
        ({"PROVIDERS": {"oauth2": {**GOOD_OAUTH2, "SMTP_SECURITY": "ssl"}}}, "xoauth2_mail.E011"),
        ({"PROVIDERS": {"oauth2": {**GOOD_OAUTH2, "SMTP_PORT": "587"}}}, "xoauth2_mail.E012"),
        ({"PROVIDERS": {"oauth2": {**GOOD_OAUTH2, "SMTP_PORT": 70000}}}, "xoauth2_mail.E012"),
        (
            {"PROVIDERS": {"oauth2": {**GOOD_OAUTH2, "SMTP_CA_FILE": "/nonexistent/ca.pem"}}},
            "xoauth2_mail.E013",
        ),
        ({"PROVIDERS": {"oauth2": {**GOOD_OAUTH2, "SCOPES": "openid email"}}}, "xoauth2_mail.E014"),
        ({"PROVIDERS": {"oauth2": {**GOOD_OAUTH2, "SMTP_SECURITY": "none"}}}, "xoauth2_mail.E015"),
        ({"PROVIDERS": {}, "DEFAULT_MAILBOXX": "typo@example.com"}, "xoauth2_mail.W001"),
        ({"PROVIDERS": {"oauth2": {**GOOD_OAUTH2, "CLIENTID": "x"}}}, "xoauth2_mail.W002"),
    ],
)
def test_each_misconfiguration_has_its_id(settings, value, expected):
    assert expected in ids_for(settings, value)


def test_valid_encryption_keys_pass(settings):
    keys = [Fernet.generate_key().decode(), Fernet.generate_key()]
    assert ids_for(settings, {"ENCRYPTION_KEYS": keys}) == []


def test_insecure_smtp_is_fine_for_loopback_or_when_allowed(settings):
    local = {**GOOD_OAUTH2, "SMTP_SECURITY": "none", "SMTP_HOST": "127.0.0.1"}
    assert ids_for(settings, {"PROVIDERS": {"oauth2": local}}) == []
    remote = {**GOOD_OAUTH2, "SMTP_SECURITY": "none"}
    allowed = {"PROVIDERS": {"oauth2": remote}, "ALLOW_INSECURE_SMTP": True}
    assert ids_for(settings, allowed) == []


def test_security_checks_are_tagged_security():
    from django.core.checks import registry

    security_checks = registry.registry.get_checks(include_deployment_checks=False)
    tagged = {getattr(check, "__name__", ""): set(check.tags) for check in security_checks}
    assert "security" in tagged["check_security"]


def test_messages_say_how_to_fix(settings):
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"oauth2": {**GOOD_OAUTH2, "TOKEN_URL": ""}}}
    # TOKEN_URL or ISSUER: reported by the ISSUER checks (E043).
    (message,) = [*check_settings(), *check_standards_settings()]
    assert "TOKEN_URL" in message.msg and message.hint


@pytest.mark.parametrize(
    ("provider", "values"),
    [
        ("google", {}),
        ("google", {"CLIENT_ID": "id"}),
        ("google", {"SERVICE_ACCOUNT_FILE": "/nonexistent/key.json"}),
        ("google", {"SERVICE_ACCOUNT_INFO": "not json"}),
        ("microsoft", {"CLIENT_ID": "id", "APP_ONLY": True, "CLIENT_SECRET": "s"}),
        ("microsoft", {"CLIENT_ID": "id", "APP_ONLY": True, "TENANT": "contoso.com"}),
        ("microsoft", {"CLIENT_ID": "id", "HTTP_CA_FILE": "/nonexistent/ca.pem"}),
    ],
)
def test_provider_specific_problems_are_e017(settings, provider, values):
    assert "xoauth2_mail.E017" in ids_for(settings, {"PROVIDERS": {provider: values}})


@pytest.mark.parametrize(
    ("provider", "values"),
    [
        ("google", {"CLIENT_ID": "id", "CLIENT_SECRET": "secret"}),
        ("google", {"SERVICE_ACCOUNT_INFO": {"type": "service_account"}}),
        ("google", {"SERVICE_ACCOUNT_INFO": '{"type": "service_account"}'}),
        ("microsoft", {"CLIENT_ID": "id"}),
        (
            "microsoft",
            {"CLIENT_ID": "id", "APP_ONLY": True, "CLIENT_SECRET": "s", "TENANT": "contoso.com"},
        ),
        ("dev", {}),
    ],
)
def test_good_provider_settings_pass(settings, provider, values):
    assert ids_for(settings, {"PROVIDERS": {provider: values}}) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"OUTBOX_LEASE": 0}, "xoauth2_mail.E050"),
        ({"OUTBOX_LEASE": "300"}, "xoauth2_mail.E050"),
        ({"OUTBOX_LEASE": 10}, "xoauth2_mail.W050"),
        ({"OUTBOX_MAX_ATTEMPTS": 0}, "xoauth2_mail.E051"),
        ({"OUTBOX_MAX_ATTEMPTS": 2.5}, "xoauth2_mail.E051"),
        ({"OUTBOX_RETRY_DELAYS": 60}, "xoauth2_mail.E052"),
        ({"OUTBOX_RETRY_DELAYS": [60, -1]}, "xoauth2_mail.E052"),
    ],
)
def test_outbox_settings(settings, value, expected):
    settings.XOAUTH2_MAIL = value
    assert [str(message.id) for message in check_outbox()] == [expected]


def test_good_outbox_settings_have_no_messages(settings):
    settings.XOAUTH2_MAIL = {
        "OUTBOX_LEASE": 600,
        "OUTBOX_MAX_ATTEMPTS": 3,
        "OUTBOX_RETRY_DELAYS": [30, 120.5],
    }
    assert check_outbox() == []


def test_task_backend_without_the_tasks_framework(settings, monkeypatch):
    settings.EMAIL_BACKEND = "django_xoauth2_mail.backends.TaskEmailBackend"
    settings.MAILERS = {"default": {"BACKEND": "django_xoauth2_mail.backends.TaskEmailBackend"}}
    assert check_outbox() == []  # installed here
    # As on a site that installed neither django.tasks (Django < 6) nor the backport:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    (error,) = check_outbox()
    assert error.id == "xoauth2_mail.E053"
    assert "django-tasks-db[compat]" in str(error.hint)
