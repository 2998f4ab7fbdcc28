"""The google provider: real google-auth against the local OAuth2 and SMTP servers."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
from django.core import mail

from django_xoauth2_mail.consent.flows import make_pkce_pair, make_state, save_consent
from django_xoauth2_mail.exceptions import (
    ConfigurationError,
    MailboxReconnectRequired,
    TokenRefreshError,
)
from django_xoauth2_mail.models import Mailbox, MailboxStatus
from django_xoauth2_mail.providers import get_provider
from django_xoauth2_mail.providers.base import GrantRevoked, TokenEndpointError
from django_xoauth2_mail.providers.google import GoogleProvider
from tests.conftest import SENDER
from tests.providers.conftest import WORKSPACE_USERS, approve, make_mailbox

pytestmark = pytest.mark.django_db(transaction=True)

REDIRECT_URI = "http://127.0.0.1:8765/"


@pytest.fixture
def mailbox(real_backend, google_settings, oauth2_server):
    return make_mailbox(SENDER, "google", oauth2_server.issue_tokens(SENDER)["refresh_token"])


def refresh_with(oauth2_server, refresh_token):
    """What the token endpoint says about a refresh token, asked without google-auth."""
    return requests.post(
        oauth2_server.token_url,
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        auth=("test-client", "test-secret"),
        timeout=5,
    )


def test_defaults_are_gmail(settings):
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"google": {"CLIENT_ID": "id"}}}
    provider = GoogleProvider({"CLIENT_ID": "id"})
    endpoint = provider.smtp_endpoint
    assert (endpoint.host, endpoint.port, endpoint.security) == ("smtp.gmail.com", 465, "tls")
    assert provider.scopes == ("https://mail.google.com/",)
    assert isinstance(get_provider("google"), GoogleProvider)


def test_send_mail_refreshes_through_google_auth(mailbox, oauth2_server, xoauth2_smtp_server):
    old_refresh_token = mailbox.refresh_token

    assert mail.send_mail("Hi", "Body", SENDER, ["to@example.org"]) == 1

    assert [r["grant_type"] for r in oauth2_server.token_requests] == ["refresh_token"]
    (attempt,) = xoauth2_smtp_server.auth_attempts
    assert attempt.accepted and attempt.user == SENDER
    mailbox.refresh_from_db()
    assert mailbox.access_token == attempt.token
    # The dev server rotates refresh tokens (Google may too): the row holds the new one.
    assert mailbox.refresh_token != old_refresh_token
    assert refresh_with(oauth2_server, old_refresh_token).json()["error"] == "invalid_grant"
    assert refresh_with(oauth2_server, mailbox.refresh_token).status_code == 200


def test_unrotated_refresh_token_is_not_reported(google_settings, oauth2_server):
    oauth2_server.rotate_refresh_tokens = False
    refresh_token = oauth2_server.issue_tokens(SENDER)["refresh_token"]

    result = GoogleProvider(google_settings).refresh_access_token(SENDER, refresh_token)

    assert result.refresh_token is None
    assert oauth2_server.validate_access_token(SENDER, result.access_token)
    assert result.scopes == ("https://mail.google.com/",)


def test_revoked_grant_flags_the_mailbox(mailbox, oauth2_server, xoauth2_smtp_server):
    oauth2_server.revoke(mailbox.refresh_token)

    with pytest.raises(MailboxReconnectRequired) as caught:
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    assert "connect_mailbox" in str(caught.value) and "invalid_grant" in str(caught.value)
    mailbox.refresh_from_db()
    assert mailbox.status == MailboxStatus.RECONNECT_REQUIRED
    assert xoauth2_smtp_server.messages == []


def test_one_outage_is_retried(mailbox, oauth2_server, xoauth2_smtp_server):
    oauth2_server.fail_next_token_requests(1, status=503)

    assert mail.send_mail("Hi", "Body", SENDER, ["to@example.org"]) == 1
    assert oauth2_server.token_request_count == 2


def test_long_outage_is_a_token_refresh_error_and_does_not_flag(mailbox, oauth2_server):
    oauth2_server.fail_next_token_requests(5, status=503)

    with pytest.raises(TokenRefreshError) as caught:
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    assert "503" in str(caught.value) and "Nothing was sent" in str(caught.value)
    # TOKEN_REFRESH_ATTEMPTS (2), and none of google-auth's own retries on top.
    assert oauth2_server.token_request_count == 2
    mailbox.refresh_from_db()
    assert mailbox.status == MailboxStatus.CONNECTED


@pytest.mark.parametrize(
    "body", [b"<html>Sign in</html>", b'{"access_token": "x", "expires_in"', b'"just a string"']
)
def test_garbage_answer_is_a_token_refresh_error(body, mailbox, oauth2_server):
    oauth2_server.fail_next_token_requests(1, status=200, body=body)

    with pytest.raises(TokenRefreshError, match="not a JSON object"):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    assert oauth2_server.token_request_count == 1  # not retryable
    mailbox.refresh_from_db()
    assert mailbox.status == MailboxStatus.CONNECTED


def test_slow_token_endpoint_times_out(google_settings, oauth2_server, settings):
    settings.XOAUTH2_MAIL["HTTP_TIMEOUT"] = 0.3
    oauth2_server.token_response_delay = 1.0
    refresh_token = oauth2_server.issue_tokens(SENDER)["refresh_token"]

    with pytest.raises(TokenEndpointError, match="did not answer within 0.3 s") as caught:
        GoogleProvider(google_settings).refresh_access_token(SENDER, refresh_token)
    assert caught.value.retryable


def test_wrong_client_secret_says_what_to_check(google_settings, oauth2_server):
    refresh_token = oauth2_server.issue_tokens(SENDER)["refresh_token"]
    provider = GoogleProvider({**google_settings, "CLIENT_SECRET": "wrong"})

    with pytest.raises(TokenEndpointError, match="invalid_client.*CLIENT_SECRET") as caught:
        provider.refresh_access_token(SENDER, refresh_token)
    assert not caught.value.retryable


def test_mailbox_without_refresh_token_or_service_account(real_backend, google_settings):
    make_mailbox(SENDER, "google")

    with pytest.raises(ConfigurationError, match="connect_mailbox google.*SERVICE_ACCOUNT_FILE"):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"], fail_silently=True)


# Workspace service account with domain-wide delegation -----------------------


@pytest.mark.parametrize("form", ["dict", "json-string", "file"])
def test_one_service_account_sends_for_two_mailboxes(
    form, tmp_path, real_backend, google_settings, service_account_info, jwt_bearer_server,
    xoauth2_smtp_server,
):  # fmt: skip
    if form == "file":
        path = tmp_path / "service-account.json"
        path.write_text(json.dumps(service_account_info))
        google_settings["SERVICE_ACCOUNT_FILE"] = str(path)
    else:
        info = json.dumps(service_account_info) if form == "json-string" else service_account_info
        google_settings["SERVICE_ACCOUNT_INFO"] = info
    del google_settings["TOKEN_URL"]  # the key's own token_uri applies
    for address in sorted(WORKSPACE_USERS):
        make_mailbox(address, "google")

    for address in sorted(WORKSPACE_USERS):
        assert mail.send_mail("Hi", "Body", address, ["to@example.org"]) == 1

    assert jwt_bearer_server.subjects == sorted(WORKSPACE_USERS)
    assert [a.user for a in xoauth2_smtp_server.auth_attempts if a.accepted] == sorted(
        WORKSPACE_USERS
    )
    for mailbox in Mailbox.objects.all():
        assert mailbox.access_token and mailbox.refresh_token is None


def test_token_url_setting_overrides_the_key_token_uri(
    google_settings, service_account_info, jwt_bearer_server
):
    google_settings["TOKEN_URL"] = jwt_bearer_server.token_url
    google_settings["SERVICE_ACCOUNT_INFO"] = {**service_account_info, "token_uri": "http://x/"}

    GoogleProvider(google_settings).refresh_access_token("alice@example.com", None)

    assert jwt_bearer_server.subjects == ["alice@example.com"]


def test_delegation_refused_is_not_a_reconnect(
    real_backend, google_settings, service_account_info, jwt_bearer_server
):
    google_settings["SERVICE_ACCOUNT_INFO"] = service_account_info
    del google_settings["TOKEN_URL"]
    mailbox = make_mailbox("stranger@example.net", "google")

    with pytest.raises(TokenRefreshError, match="Invalid email or User ID.*Domain-wide delegation"):
        mail.send_mail("Hi", "Body", "stranger@example.net", ["to@example.org"])

    mailbox.refresh_from_db()
    assert mailbox.status == MailboxStatus.CONNECTED  # nobody can consent for it: not flagged
    assert jwt_bearer_server.requests == 1


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ("{not json", "not a service account key"),
        ({"type": "service_account", "client_email": "x@y"}, "key is not usable"),
    ],
)
def test_broken_service_account_key_is_a_configuration_error(info, message, google_settings):
    google_settings["SERVICE_ACCOUNT_INFO"] = info
    with pytest.raises(ConfigurationError, match=message):
        GoogleProvider(google_settings).refresh_access_token("alice@example.com", None)


def test_missing_service_account_file_is_a_configuration_error(google_settings, tmp_path):
    google_settings["SERVICE_ACCOUNT_FILE"] = str(tmp_path / "missing.json")
    with pytest.raises(ConfigurationError, match="Cannot read .*missing.json"):
        GoogleProvider(google_settings).refresh_access_token("alice@example.com", None)


# Consent ----------------------------------------------------------------------


def test_authorization_url(google_settings, oauth2_server):
    pkce, state = make_pkce_pair(), make_state()
    url = GoogleProvider(google_settings).authorization_url(
        redirect_uri=REDIRECT_URI, state=state, code_challenge=pkce.challenge, login_hint=SENDER
    )

    assert url.startswith(oauth2_server.authorization_url + "?")
    params = {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}
    assert params == {
        "response_type": "code",
        "client_id": "test-client",
        "redirect_uri": REDIRECT_URI,
        "scope": "https://mail.google.com/ openid email",
        "state": state,
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
        "access_type": "offline",
        "prompt": "consent",
        "include_granted_scopes": "true",
        "login_hint": SENDER,
    }


def test_consent_then_send(real_backend, google_settings, oauth2_server, xoauth2_smtp_server):
    provider, pkce, state = GoogleProvider(google_settings), make_pkce_pair(), make_state()
    url = provider.authorization_url(
        redirect_uri=REDIRECT_URI, state=state, code_challenge=pkce.challenge
    )
    answer = approve(url, "Person@Example.com")
    assert answer["state"] == state

    result = provider.exchange_code(
        code=answer["code"], redirect_uri=REDIRECT_URI, code_verifier=pkce.verifier
    )

    assert result.email == "Person@Example.com"  # from the ID token
    assert result.refresh_token and "https://mail.google.com/" in result.scopes
    save_consent("google", result, None)
    assert mail.send_mail("Hi", "Body", "person@example.com", ["to@example.org"]) == 1
    assert oauth2_server.token_request_count == 1  # the exchange; its access token was used


def test_exchange_with_the_wrong_verifier_is_refused(google_settings):
    provider, pkce = GoogleProvider(google_settings), make_pkce_pair()
    url = provider.authorization_url(
        redirect_uri=REDIRECT_URI, state="s", code_challenge=pkce.challenge
    )
    code = approve(url, SENDER)["code"]

    with pytest.raises(GrantRevoked, match="PKCE"):
        provider.exchange_code(
            code=code, redirect_uri=REDIRECT_URI, code_verifier=make_pkce_pair().verifier
        )


def test_consent_without_the_gmail_permission_is_refused(google_settings):
    provider, pkce = GoogleProvider(google_settings), make_pkce_pair()
    url = provider.authorization_url(
        redirect_uri=REDIRECT_URI, state="s", code_challenge=pkce.challenge
    )
    # As when the person unticks the Gmail box on Google's consent screen.
    parts = urlsplit(url)
    params = {name: values[0] for name, values in parse_qs(parts.query).items()}
    params["scope"] = "openid email"
    code = approve(parts._replace(query=urlencode(params)).geturl(), SENDER)["code"]

    with pytest.raises(TokenEndpointError, match="tick that box"):
        provider.exchange_code(code=code, redirect_uri=REDIRECT_URI, code_verifier=pkce.verifier)


def test_revoke_token(google_settings, oauth2_server):
    refresh_token = oauth2_server.issue_tokens(SENDER)["refresh_token"]
    provider = GoogleProvider(google_settings)

    assert provider.revoke_token(refresh_token) is True

    with pytest.raises(GrantRevoked):
        provider.refresh_access_token(SENDER, refresh_token)


def test_unreachable_revocation_endpoint_returns_false(google_settings):
    google_settings["REVOCATION_URL"] = "http://127.0.0.1:9/revoke"
    assert GoogleProvider(google_settings).revoke_token("token") is False


def test_connect_mailbox_no_consent_adds_a_delegated_mailbox(
    google_settings, service_account_info, jwt_bearer_server, xoauth2_smtp_server
):
    import io

    from django.core.management import call_command

    google_settings["SERVICE_ACCOUNT_INFO"] = service_account_info
    del google_settings["TOKEN_URL"]
    out = io.StringIO()
    call_command(
        "connect_mailbox", "google", "--no-consent", "--email", "Alice@example.com", stdout=out
    )

    mailbox = Mailbox.objects.get()
    assert (mailbox.email, mailbox.refresh_token) == ("alice@example.com", None)
    assert "No refresh token needed" in out.getvalue() and "SMTP login to" in out.getvalue()
    assert set(jwt_bearer_server.subjects) == {"alice@example.com"}  # delegated as alice


def test_connect_mailbox_no_consent_refused_without_a_service_account(google_settings):
    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError, match="SERVICE_ACCOUNT_FILE"):
        call_command("connect_mailbox", "google", "--no-consent", "--email", "a@example.com")
    assert not Mailbox.objects.exists()


def test_connect_mailbox_no_consent_keeps_nothing_when_delegation_fails(
    google_settings, service_account_info, jwt_bearer_server
):
    from django.core.management import CommandError, call_command

    google_settings["SERVICE_ACCOUNT_INFO"] = service_account_info
    del google_settings["TOKEN_URL"]
    with pytest.raises(CommandError):
        call_command("connect_mailbox", "google", "--no-consent", "--email", "stranger@example.net")
    assert not Mailbox.objects.exists()
