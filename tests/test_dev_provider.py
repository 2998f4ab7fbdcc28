"""The ``dev`` provider: defaults that match ``xoauth2_devserver``, overrides, and mail
sent through it end to end (consent, send, refresh, revocation)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from django.core import mail
from django.core.checks import Error
from django.utils import timezone

from django_xoauth2_mail import signals
from django_xoauth2_mail.checks import check_settings
from django_xoauth2_mail.consent.flows import make_pkce_pair, save_consent
from django_xoauth2_mail.exceptions import ConfigurationError, MailboxReconnectRequired
from django_xoauth2_mail.models import Mailbox, MailboxStatus
from django_xoauth2_mail.providers import get_provider
from django_xoauth2_mail.providers.base import SMTPEndpoint
from django_xoauth2_mail.providers.dev import DevProvider
from tests.test_devserver_command import running_devserver

DEMO = "demo@example.com"


def test_an_empty_settings_dict_is_a_complete_configuration(settings: Any) -> None:
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"dev": {}}}
    provider = get_provider("dev")

    assert isinstance(provider, DevProvider)
    assert provider.base_url == "http://127.0.0.1:8765"
    assert provider.settings["AUTHORIZATION_URL"] == "http://127.0.0.1:8765/authorize"
    assert provider.settings["TOKEN_URL"] == "http://127.0.0.1:8765/token"
    assert provider.settings["USERINFO_URL"] == "http://127.0.0.1:8765/userinfo"
    assert provider.settings["REVOCATION_URL"] == "http://127.0.0.1:8765/revoke"
    assert (provider.client_id, provider.client_secret) == ("dev-client", "dev-secret")
    assert provider.smtp_endpoint == SMTPEndpoint("127.0.0.1", 2525, "none")
    assert provider.scopes == ("openid", "email", "https://mail.google.com/")
    assert provider.rate_limit is None
    assert not [m for m in check_settings() if isinstance(m, Error)]


def test_works_with_an_empty_dict(settings: Any) -> None:
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"dev": {}}}
    assert get_provider("dev").smtp_endpoint.port == 2525


def test_is_not_used_unless_configured(settings: Any) -> None:
    settings.XOAUTH2_MAIL = {}
    with pytest.raises(ConfigurationError, match=r"'dev' is not in XOAUTH2_MAIL\['PROVIDERS'\]"):
        get_provider("dev")


def test_base_url_moves_every_endpoint_and_the_smtp_host() -> None:
    provider = DevProvider({"BASE_URL": "http://[::1]:9000/", "SMTP_PORT": 2600})

    assert provider.base_url == "http://[::1]:9000"
    assert provider.settings["TOKEN_URL"] == "http://[::1]:9000/token"
    assert provider.smtp_endpoint == SMTPEndpoint("::1", 2600, "none")


def test_each_setting_can_be_overridden() -> None:
    provider = DevProvider(
        {
            "TOKEN_URL": "http://127.0.0.1:1/t",
            "CLIENT_ID": "mine",
            "CLIENT_SECRET": "secret",
            "SCOPES": ["https://mail.google.com/"],
            "SMTP_HOST": "localhost",
            "SMTP_SECURITY": "starttls",
            "RATE_LIMIT": 30,
            "USERINFO_URL": None,  # None or "" means "the default"
        }
    )
    assert provider.settings["TOKEN_URL"] == "http://127.0.0.1:1/t"
    assert provider.settings["AUTHORIZATION_URL"] == "http://127.0.0.1:8765/authorize"
    assert provider.settings["USERINFO_URL"] == "http://127.0.0.1:8765/userinfo"
    assert (provider.client_id, provider.client_secret) == ("mine", "secret")
    assert provider.scopes == ("https://mail.google.com/",)
    assert provider.smtp_endpoint == SMTPEndpoint("localhost", 2525, "starttls")
    assert provider.rate_limit == 30


def test_repr_hides_the_secret() -> None:
    assert "dev-secret" not in repr(DevProvider({}))


def test_base_url_is_a_known_setting(settings: Any) -> None:
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"dev": {"BASE_URL": "http://127.0.0.1:9000"}}}
    assert check_settings() == []


# End to end, against the real command -----------------------------------------------------


@pytest.fixture
def dev_site(tmp_path: Path, settings: Any, real_backend: None, transactional_db: None) -> Any:
    """A running xoauth2_devserver and a site whose dev provider points at it."""
    with running_devserver(tmp_path, "--auto-approve") as server:
        settings.XOAUTH2_MAIL = {
            "PROVIDERS": {"dev": {"BASE_URL": server.base_url, "SMTP_PORT": server.smtp_port}},
            # Below the server's 120 s token lifetime, so a fresh token is reused.
            "TOKEN_REFRESH_SKEW": 10,
            "SMTP_TIMEOUT": 5,
            "HTTP_TIMEOUT": 5,
        }
        yield server


def connect_through_consent(email: str) -> Mailbox:
    """What connect_mailbox does: consent with PKCE, code exchange, save the Mailbox."""
    provider = get_provider("dev")
    pkce, redirect_uri = make_pkce_pair(), "http://127.0.0.1:9/"
    url = provider.authorization_url(
        redirect_uri=redirect_uri, state="s", code_challenge=pkce.challenge, login_hint=email
    )
    answer = requests.get(url, allow_redirects=False, timeout=5)  # auto-approved
    code = parse_qs(urlsplit(answer.headers["Location"]).query)["code"][0]
    result = provider.exchange_code(
        code=code, redirect_uri=redirect_uri, code_verifier=pkce.verifier
    )
    assert result.email == email  # from the ID token
    return save_consent("dev", result, email)


def test_send_mail_through_the_dev_provider_end_to_end(dev_site: Any) -> None:
    mailbox = connect_through_consent(DEMO)
    refreshed: list[dict[str, Any]] = []

    def on_refresh(**kwargs: Any) -> None:
        refreshed.append(kwargs)

    signals.token_refreshed.connect(on_refresh)
    try:
        assert mail.send_mail("First", "Body one", DEMO, ["to@example.org"]) == 1
        assert refreshed == []  # the consent's access token was fresh
        # Expire the cached token: the next send refreshes it first.
        Mailbox.objects.filter(pk=mailbox.pk).update(access_token_expires_at=timezone.now())
        assert mail.send_mail("Second", "Body two", DEMO, ["to@example.org"]) == 1
    finally:
        signals.token_refreshed.disconnect(on_refresh)

    assert len(refreshed) == 1 and refreshed[0]["refresh_token_rotated"] is True
    output = dev_site.wait_for_output("'Second'")
    assert f"{DEMO} -> to@example.org  'First'" in output
    emls = sorted(dev_site.maildir.glob("*.eml"))
    assert [b"Body one" in f.read_bytes() for f in emls] == [True, False]
    mailbox.refresh_from_db()
    expires_at = mailbox.access_token_expires_at
    assert expires_at is not None and expires_at > timezone.now() + dt.timedelta(seconds=60)


def test_revoked_consent_asks_for_a_reconnect(dev_site: Any) -> None:
    mailbox = connect_through_consent(DEMO)
    assert get_provider("dev").revoke_token(mailbox.refresh_token or "") is True

    with pytest.raises(MailboxReconnectRequired, match="connect_mailbox"):
        mail.send_mail("Lost", "Body", DEMO, ["to@example.org"])

    mailbox.refresh_from_db()
    assert mailbox.status == MailboxStatus.RECONNECT_REQUIRED
    assert not list(dev_site.maildir.glob("*.eml"))
