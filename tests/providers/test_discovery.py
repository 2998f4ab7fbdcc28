"""The oauth2 provider configured by ISSUER: endpoints discovered from RFC 8414 and OpenID
Connect metadata published by the package's own OAuth2 server, and sent through."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from django.core import mail

from django_xoauth2_mail.exceptions import ConfigurationError, TokenRefreshError
from django_xoauth2_mail.models import MailboxStatus
from django_xoauth2_mail.providers import discovery
from django_xoauth2_mail.providers.discovery import MetadataUnavailable
from django_xoauth2_mail.providers.google import GoogleProvider
from django_xoauth2_mail.providers.oauth2 import OAuth2Provider
from django_xoauth2_mail.testing import OAuth2Server, XOAuth2SMTPServer
from django_xoauth2_mail.testing.fixtures import TEST_CLIENT_ID, TEST_CLIENT_SECRET
from tests.conftest import SENDER, make_mailbox

RFC8414 = "oauth-authorization-server"
OIDC = "openid-configuration"


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    discovery.clear_cache()
    yield
    discovery.clear_cache()


@pytest.fixture
def keycloak_like() -> Iterator[OAuth2Server]:
    """An OAuth2 server whose issuer has a path, as Keycloak's realms do."""
    with OAuth2Server(issuer_path="/realms/mail") as server:
        server.add_client(TEST_CLIENT_ID, TEST_CLIENT_SECRET)
        yield server


@pytest.fixture
def keycloak_smtp(keycloak_like: OAuth2Server) -> Iterator[XOAuth2SMTPServer]:
    """A mail server that trusts ``keycloak_like``'s tokens (Dovecot in the docs' example)."""
    with XOAuth2SMTPServer(keycloak_like.validate_access_token) as server:
        yield server


def issuer_settings(settings: Any, server: OAuth2Server, smtp: Any, **extra: Any) -> None:
    settings.XOAUTH2_MAIL = {
        "PROVIDERS": {
            "oauth2": {
                "CLIENT_ID": TEST_CLIENT_ID,
                "CLIENT_SECRET": TEST_CLIENT_SECRET,
                "ISSUER": server.issuer,
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": smtp.port,
                "SMTP_SECURITY": "none",
                **extra,
            }
        },
        "TOKEN_REFRESH_ATTEMPTS": 2,
        "HTTP_TIMEOUT": 5,
        "SMTP_TIMEOUT": 5,
    }


def send() -> int:
    return mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])


# Where metadata is read -----------------------------------------------------------------


def test_rfc_8414_url_puts_the_well_known_part_before_the_issuers_path():
    assert discovery.metadata_urls("https://id.example.com/realms/mail") == (
        "https://id.example.com/.well-known/oauth-authorization-server/realms/mail",
        "https://id.example.com/realms/mail/.well-known/openid-configuration",
    )
    assert discovery.rfc8414_url("https://id.example.com/") == (
        "https://id.example.com/.well-known/oauth-authorization-server"
    )


@pytest.mark.django_db(transaction=True)
def test_discovery_from_rfc_8414_with_a_path_bearing_issuer(
    settings, real_backend, keycloak_like, keycloak_smtp
):
    keycloak_like.metadata_documents = {RFC8414}
    issuer_settings(settings, keycloak_like, keycloak_smtp)
    make_mailbox(keycloak_like)

    provider = OAuth2Provider()
    metadata = provider.metadata()

    base = keycloak_like.base_url
    assert metadata.issuer == f"{base}/realms/mail"
    assert metadata.sources == (f"{base}/.well-known/oauth-authorization-server/realms/mail",)
    assert provider._setting("TOKEN_URL") == keycloak_like.token_url
    # And mail goes out with the token refreshed at the discovered endpoint.
    assert send() == 1
    assert keycloak_like.token_request_count == 1
    assert keycloak_smtp.messages[0].auth_user == SENDER


@pytest.mark.django_db(transaction=True)
def test_discovery_from_openid_connect_only(settings, real_backend, keycloak_like, keycloak_smtp):
    keycloak_like.metadata_documents = {OIDC}
    issuer_settings(settings, keycloak_like, keycloak_smtp)
    make_mailbox(keycloak_like)

    metadata = OAuth2Provider().metadata()

    assert metadata.sources == (
        f"{keycloak_like.base_url}/realms/mail/.well-known/openid-configuration",
    )
    assert send() == 1


def test_both_documents_are_merged_rfc_8414_first(settings, keycloak_like):
    # As real servers do: revocation only in one, userinfo only in the other, and a
    # token endpoint named differently (RFC 8414's wins).
    keycloak_like.metadata_changes = {
        RFC8414: {"userinfo_endpoint": None},
        OIDC: {"revocation_endpoint": None, "token_endpoint": "https://other.example/token"},
    }
    issuer_settings(settings, keycloak_like, keycloak_like)

    provider = OAuth2Provider()

    assert len(provider.metadata().sources) == 2
    assert provider._setting("USERINFO_URL") == keycloak_like.userinfo_url
    assert provider._setting("REVOCATION_URL") == keycloak_like.revocation_url
    assert provider._setting("TOKEN_URL") == keycloak_like.token_url
    assert provider._setting("DEVICE_AUTHORIZATION_URL") == (keycloak_like.device_authorization_url)


def test_explicit_urls_win_over_discovered_ones(settings, keycloak_like):
    issuer_settings(
        settings,
        keycloak_like,
        keycloak_like,
        AUTHORIZATION_URL="https://login.example/authorize",
        TOKEN_URL="https://login.example/token",
    )
    provider = OAuth2Provider()

    url = provider.authorization_url(
        redirect_uri="http://127.0.0.1:1/", state="s", code_challenge="c" * 43
    )

    assert url.startswith("https://login.example/authorize?")
    assert provider._setting("TOKEN_URL") == "https://login.example/token"
    assert provider._setting("USERINFO_URL") == keycloak_like.userinfo_url  # still discovered


@pytest.mark.django_db(transaction=True)
def test_explicit_token_url_is_used_when_the_metadata_names_another(
    settings, real_backend, keycloak_like, keycloak_smtp
):
    keycloak_like.metadata_changes = {
        RFC8414: {"token_endpoint": "http://127.0.0.1:9/nowhere"},
        OIDC: {"token_endpoint": "http://127.0.0.1:9/nowhere"},
    }
    issuer_settings(settings, keycloak_like, keycloak_smtp, TOKEN_URL=keycloak_like.token_url)
    make_mailbox(keycloak_like)

    assert send() == 1
    assert keycloak_like.token_request_count == 1


# What is refused ------------------------------------------------------------------------


@pytest.mark.parametrize("document", [RFC8414, OIDC])
def test_issuer_mismatch_is_refused(settings, keycloak_like, document):
    keycloak_like.metadata_changes = {document: {"issuer": "https://evil.example/realms/mail"}}
    issuer_settings(settings, keycloak_like, keycloak_like)

    with pytest.raises(ConfigurationError) as caught:
        OAuth2Provider().metadata()

    message = str(caught.value)
    assert "https://evil.example/realms/mail" in message and "RFC 8414" in message


def test_issuer_differing_by_a_trailing_slash_is_refused(settings, keycloak_like):
    issuer_settings(settings, keycloak_like, keycloak_like, ISSUER=keycloak_like.issuer + "/")
    with pytest.raises(ConfigurationError, match="identical"):
        OAuth2Provider().metadata()


@pytest.mark.django_db(transaction=True)
def test_issuer_mismatch_refuses_to_send(settings, real_backend, keycloak_like, keycloak_smtp):
    keycloak_like.metadata_changes = {RFC8414: {"issuer": "https://evil.example"}}
    issuer_settings(settings, keycloak_like, keycloak_smtp)
    make_mailbox(keycloak_like)

    with pytest.raises(ConfigurationError):
        send()
    assert keycloak_like.token_request_count == 0  # no token went to a doubtful server
    assert keycloak_smtp.messages == []


def test_metadata_without_s256_is_refused(settings, keycloak_like):
    keycloak_like.metadata_changes = {
        RFC8414: {"code_challenge_methods_supported": ["plain"]},
        OIDC: {"code_challenge_methods_supported": ["plain"]},
    }
    issuer_settings(settings, keycloak_like, keycloak_like)

    with pytest.raises(ConfigurationError, match="S256"):
        OAuth2Provider().metadata()


# Failures at send time ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_unreachable_metadata_at_send_time_is_a_temporary_token_refresh_error(
    settings, real_backend, oauth2_server, xoauth2_smtp_server
):
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    issuer_settings(settings, oauth2_server, xoauth2_smtp_server)
    settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["ISSUER"] = f"http://127.0.0.1:{port}"
    mailbox = make_mailbox(oauth2_server)

    with pytest.raises(TokenRefreshError) as caught:
        send()

    assert f"127.0.0.1:{port}/.well-known/" in str(caught.value)
    mailbox.refresh_from_db()
    assert mailbox.status == MailboxStatus.CONNECTED  # temporary: not flagged


@pytest.mark.django_db(transaction=True)
def test_no_metadata_published_is_a_token_refresh_error_naming_issuer(
    settings, real_backend, keycloak_like, keycloak_smtp
):
    keycloak_like.metadata_documents = set()
    issuer_settings(settings, keycloak_like, keycloak_smtp)
    make_mailbox(keycloak_like)

    with pytest.raises(TokenRefreshError, match="publishes no metadata for the ISSUER"):
        send()


def test_a_silent_metadata_server_fails_within_the_http_timeout(settings, keycloak_like):
    issuer_settings(settings, keycloak_like, keycloak_like)
    settings.XOAUTH2_MAIL["HTTP_TIMEOUT"] = 0.5
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        issuer = f"http://127.0.0.1:{silent.getsockname()[1]}"
        settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["ISSUER"] = issuer
        with pytest.raises(MetadataUnavailable, match="did not arrive within 0.5 s") as caught:
            OAuth2Provider().metadata()
    assert caught.value.retryable


# The cache ------------------------------------------------------------------------------


def test_metadata_is_cached_for_a_bounded_time(settings, keycloak_like, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(discovery, "_clock", lambda: now[0])
    issuer_settings(settings, keycloak_like, keycloak_like)
    settings.XOAUTH2_MAIL["DISCOVERY_CACHE_SECONDS"] = 600

    OAuth2Provider().metadata()
    OAuth2Provider().metadata()
    assert len(keycloak_like.metadata_requests) == 2  # both documents, once

    now[0] += 601
    keycloak_like.metadata_changes = {RFC8414: {"token_endpoint": "https://moved.example/t"}}
    assert OAuth2Provider()._setting("TOKEN_URL") == "https://moved.example/t"
    assert len(keycloak_like.metadata_requests) == 4


def test_a_failed_refetch_keeps_the_copy_it_has(settings, keycloak_like, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(discovery, "_clock", lambda: now[0])
    issuer_settings(settings, keycloak_like, keycloak_like)
    first = OAuth2Provider().metadata()

    now[0] += 7200
    keycloak_like.stop()

    assert OAuth2Provider().metadata() is first


# RFC 9207 -------------------------------------------------------------------------------


def test_iss_parameter_support_turns_on_the_iss_check(settings, keycloak_like):
    issuer_settings(settings, keycloak_like, keycloak_like)
    # The dev server says it sends iss; a server that does not say so gets no check.
    keycloak_like.metadata_changes = {
        document: {"authorization_response_iss_parameter_supported": None}
        for document in (RFC8414, OIDC)
    }
    assert OAuth2Provider().requires_iss is False

    discovery.clear_cache()
    keycloak_like.metadata_changes = {
        RFC8414: {"authorization_response_iss_parameter_supported": True}
    }
    provider = OAuth2Provider()
    assert provider.requires_iss is True
    assert provider.issuer == keycloak_like.issuer


def test_providers_without_issuer_need_no_iss():
    # Google names its issuer (it may send iss) but is not known to always send it.
    google = GoogleProvider({"CLIENT_ID": "id", "CLIENT_SECRET": "secret"})
    assert google.issuer == "https://accounts.google.com" and google.requires_iss is False
    assert OAuth2Provider({"TOKEN_URL": "https://x.example/token"}).requires_iss is False


def test_revocation_is_best_effort_when_the_metadata_is_unreachable(settings, oauth2_server):
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    issuer_settings(settings, oauth2_server, oauth2_server, ISSUER=f"http://127.0.0.1:{port}")
    assert OAuth2Provider().revoke_token("a-refresh-token") is False


def test_revocation_uses_the_discovered_endpoint(settings, keycloak_like):
    issuer_settings(settings, keycloak_like, keycloak_like)
    tokens = keycloak_like.issue_tokens(SENDER)

    assert OAuth2Provider().revoke_token(tokens["refresh_token"]) is True
    assert not keycloak_like.validate_access_token(SENDER, tokens["access_token"])
