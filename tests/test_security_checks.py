"""The security system checks: TLS settings, DEBUG with real providers, the dev provider
in production. One test (or more) per check id."""

from __future__ import annotations

import io
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.management import call_command

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


def run_ids(*, deploy: bool = False) -> list[str]:
    return sorted(
        str(message.id)
        for message in run_checks(include_deployment_checks=deploy)
        if str(message.id).startswith("xoauth2_mail.")
    )


@pytest.mark.parametrize("provider", ["google", "microsoft", "oauth2"])
def test_debug_with_a_real_provider_is_w010(settings, provider):
    settings.DEBUG = True
    settings.XOAUTH2_MAIL = {"PROVIDERS": {provider: {**GOOD_OAUTH2, "TENANT": "x"}}}
    if provider == "microsoft":
        settings.XOAUTH2_MAIL["PROVIDERS"][provider].pop("SMTP_HOST")
    assert "xoauth2_mail.W010" in run_ids()


def test_debug_with_only_the_dev_provider_is_fine(settings):
    settings.DEBUG = True
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"dev": {}}}
    assert run_ids() == []


def test_a_real_provider_without_debug_is_fine(settings):
    settings.DEBUG = False
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"oauth2": GOOD_OAUTH2}}
    assert run_ids() == [] and run_ids(deploy=True) == []


def test_the_dev_provider_without_debug_is_w011(settings):
    settings.DEBUG = False
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"dev": {}, "oauth2": GOOD_OAUTH2}}
    assert run_ids() == ["xoauth2_mail.W011"]
    assert run_ids(deploy=True) == ["xoauth2_mail.W011"]  # reported once


def test_check_deploy_reports_the_dev_provider_even_with_debug(settings):
    settings.DEBUG = True
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"dev": {}}}
    assert run_ids() == []
    assert run_ids(deploy=True) == ["xoauth2_mail.W011"]


def test_manage_py_check_deploy_prints_it(settings):
    settings.DEBUG = False
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"dev": {}}}
    output = io.StringIO()
    # Other apps' deploy checks may be errors on some Django versions: report, not fail.
    call_command("check", deploy=True, fail_level="CRITICAL", stdout=output, stderr=output)
    assert "xoauth2_mail.W011" in output.getvalue()
