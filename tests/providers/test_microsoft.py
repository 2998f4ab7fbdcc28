"""The microsoft provider: real msal against the local OAuth2 server over HTTPS (msal accepts
nothing else), with its tenant discovery document, and the XOAUTH2 SMTP server."""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from django.core import mail

from django_xoauth2_mail.consent.flows import make_pkce_pair, make_state, save_consent
from django_xoauth2_mail.exceptions import (
    ConfigurationError,
    MailboxReconnectRequired,
    TokenRefreshError,
)
from django_xoauth2_mail.models import Mailbox, MailboxStatus
from django_xoauth2_mail.providers.base import (
    DeviceFlowDenied,
    DeviceFlowExpired,
    GrantRevoked,
    TokenEndpointError,
)
from django_xoauth2_mail.providers.microsoft import MicrosoftProvider
from tests.conftest import SENDER
from tests.providers.conftest import PUBLIC_CLIENT_ID, SMTP_SEND, approve, make_mailbox

pytestmark = pytest.mark.django_db(transaction=True)

REDIRECT_URI = "http://localhost:8400/"
AADSTS700082 = (
    "AADSTS700082: The refresh token has expired due to inactivity. The token was issued on "
    "2026-01-01T00:00:00Z and was inactive for 90.00:00:00.\r\nTrace ID: 0000\r\n"
    "Correlation ID: 1111\r\nTimestamp: 2026-04-01 00:00:00Z"
)


def issue_refresh_token(server, email=SENDER):
    return server.issue_tokens(email, scope=f"{SMTP_SEND} offline_access")["refresh_token"]


def json_error(status, error, description):
    body = json.dumps({"error": error, "error_description": description}).encode()
    return {"status": status, "body": body, "content_type": "application/json"}


PUBLIC_CLIENT_REFUSAL = json_error(
    400,
    "invalid_client",
    "AADSTS700025: Client is public so neither 'client_assertion' nor 'client_secret' should "
    "be presented.\r\nTrace ID: 2222",
)


@pytest.fixture
def mailbox(real_backend, microsoft_settings, https_oauth2_server):
    return make_mailbox(SENDER, "microsoft", issue_refresh_token(https_oauth2_server))


def test_defaults_are_office365():
    provider = MicrosoftProvider({"CLIENT_ID": "id"})
    endpoint = provider.smtp_endpoint
    assert (endpoint.host, endpoint.port, endpoint.security) == (
        "smtp.office365.com", 587, "starttls",
    )  # fmt: skip
    assert provider.authority == "https://login.microsoftonline.com/common"
    assert provider.scopes == (SMTP_SEND,)
    assert provider.rate_limit == 30
    assert MicrosoftProvider({"TENANT": "contoso.onmicrosoft.com"}).authority.endswith(
        "/contoso.onmicrosoft.com"
    )


def test_refresh_rotates_and_the_row_keeps_the_newest(mailbox, https_oauth2_server, settings):
    first = mailbox.refresh_token

    assert mail.send_mail("One", "Body", SENDER, ["to@example.org"]) == 1
    mailbox.refresh_from_db()
    second = mailbox.refresh_token
    assert second != first
    # Found through the tenant's discovery document, like login.microsoftonline.com.
    assert [r["path"] for r in https_oauth2_server.token_requests] == ["/common/oauth2/v2.0/token"]

    # The old token is dead now: a send that needs a refresh works only because the row
    # holds the new one.
    https_oauth2_server.expire_access_tokens()
    Mailbox.objects.filter(pk=mailbox.pk).update(access_token_expires_at=None)
    assert mail.send_mail("Two", "Body", SENDER, ["to@example.org"]) == 1
    mailbox.refresh_from_db()
    assert mailbox.refresh_token not in (first, second)
    provider = MicrosoftProvider(settings.XOAUTH2_MAIL["PROVIDERS"]["microsoft"])
    for dead in (first, second):
        with pytest.raises(GrantRevoked, match="already rotated"):
            provider.refresh_access_token(SENDER, dead)


def test_revoked_grant_flags_the_mailbox(mailbox, https_oauth2_server, microsoft_smtp_server):
    https_oauth2_server.revoke(mailbox.refresh_token)

    with pytest.raises(MailboxReconnectRequired, match="invalid_grant.*connect_mailbox"):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    mailbox.refresh_from_db()
    assert mailbox.status == MailboxStatus.RECONNECT_REQUIRED
    assert microsoft_smtp_server.messages == []


def test_expired_refresh_token_keeps_the_first_line_of_the_description(
    mailbox, https_oauth2_server
):
    https_oauth2_server.fail_next_token_requests(
        1, **json_error(400, "invalid_grant", AADSTS700082)
    )

    with pytest.raises(MailboxReconnectRequired) as caught:
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    assert "AADSTS700082: The refresh token has expired due to inactivity." in str(caught.value)
    mailbox.refresh_from_db()
    assert mailbox.last_error.startswith("invalid_grant: AADSTS700082")
    assert "Trace ID" not in mailbox.last_error


def test_interaction_required_is_a_reconnect(microsoft_settings, https_oauth2_server):
    https_oauth2_server.fail_next_token_requests(
        1, **json_error(400, "interaction_required", "AADSTS50076: MFA required.\r\nTrace ID: 1")
    )
    with pytest.raises(GrantRevoked, match="^interaction_required: AADSTS50076: MFA required.$"):
        MicrosoftProvider(microsoft_settings).refresh_access_token(SENDER, "any")


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 503},
        json_error(400, "temporarily_unavailable", "AADSTS50196: try again"),
    ],
    ids=["http-503", "temporarily_unavailable"],
)
def test_one_outage_is_retried(fault, mailbox, https_oauth2_server):
    https_oauth2_server.fail_next_token_requests(1, **fault)

    assert mail.send_mail("Hi", "Body", SENDER, ["to@example.org"]) == 1
    assert https_oauth2_server.token_request_count == 2


def test_long_outage_is_a_token_refresh_error_and_does_not_flag(mailbox, https_oauth2_server):
    https_oauth2_server.fail_next_token_requests(5, status=503)

    with pytest.raises(TokenRefreshError, match="503.*Nothing was sent"):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])

    assert https_oauth2_server.token_request_count == 2  # TOKEN_REFRESH_ATTEMPTS
    mailbox.refresh_from_db()
    assert mailbox.status == MailboxStatus.CONNECTED
    assert mailbox.refresh_token  # still the one it had: nothing to lose on an outage


def test_garbage_answer_is_a_token_refresh_error(mailbox, https_oauth2_server):
    https_oauth2_server.fail_next_token_requests(1, status=200, body=b"<html>Sign in</html>")

    with pytest.raises(TokenRefreshError, match="not JSON"):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])
    assert https_oauth2_server.token_request_count == 1


def test_wrong_client_secret_says_what_to_do(microsoft_settings, https_oauth2_server):
    provider = MicrosoftProvider({**microsoft_settings, "CLIENT_SECRET": "wrong"})
    with pytest.raises(
        TokenEndpointError, match="invalid_client.*Certificates & secrets"
    ) as caught:
        provider.refresh_access_token(SENDER, issue_refresh_token(https_oauth2_server))
    assert not caught.value.retryable
    assert https_oauth2_server.token_request_count == 1  # not retried as a public client


def test_device_flow_token_is_refreshed_as_a_public_client(microsoft_settings, https_oauth2_server):
    # A refresh token from the device code flow belongs to the public client: Entra refuses
    # the secret when it is refreshed (AADSTS700025), so it is refreshed without.
    microsoft_settings.update(CLIENT_ID=PUBLIC_CLIENT_ID, CLIENT_SECRET="web-flow-secret")
    https_oauth2_server.fail_next_token_requests(1, **PUBLIC_CLIENT_REFUSAL)

    result = MicrosoftProvider(microsoft_settings).refresh_access_token(
        SENDER, issue_refresh_token(https_oauth2_server)
    )

    assert https_oauth2_server.validate_access_token(SENDER, result.access_token)
    assert https_oauth2_server.token_request_count == 2


def test_untrusted_certificate_points_at_http_ca_file(microsoft_settings):
    del microsoft_settings["HTTP_CA_FILE"]
    with pytest.raises(TokenEndpointError, match="not trusted.*HTTP_CA_FILE") as caught:
        MicrosoftProvider(microsoft_settings).refresh_access_token(SENDER, "any")
    assert not caught.value.retryable


def test_unreachable_authority_is_retryable(microsoft_settings):
    microsoft_settings["AUTHORITY_HOST"] = "https://127.0.0.1:9"
    with pytest.raises(TokenEndpointError, match="could not be reached") as caught:
        MicrosoftProvider(microsoft_settings).refresh_access_token(SENDER, "any")
    assert caught.value.retryable


def test_reserved_scopes_in_settings_are_left_to_msal(microsoft_settings, https_oauth2_server):
    # msal raises ValueError for offline_access/openid/profile: it adds them itself.
    microsoft_settings["SCOPES"] = [SMTP_SEND, "offline_access", "openid"]
    result = MicrosoftProvider(microsoft_settings).refresh_access_token(
        SENDER, issue_refresh_token(https_oauth2_server)
    )
    assert https_oauth2_server.validate_access_token(SENDER, result.access_token)


def test_mailbox_without_refresh_token_needs_app_only(real_backend, microsoft_settings):
    make_mailbox(SENDER, "microsoft")
    with pytest.raises(ConfigurationError, match="connect_mailbox microsoft.*APP_ONLY"):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.org"])


# App-only (client credentials) -------------------------------------------------


def test_app_only_sends_for_two_mailboxes(
    real_backend, microsoft_settings, https_oauth2_server, microsoft_smtp_server
):
    microsoft_settings.update(APP_ONLY=True, TENANT="contoso-tenant-id")
    addresses = ["alice@contoso.example", "bob@contoso.example"]
    for address in addresses:
        make_mailbox(address, "microsoft")

    for address in addresses:
        assert mail.send_mail("Hi", "Body", address, ["to@example.org"]) == 1

    assert https_oauth2_server.token_requests == [
        {"grant_type": "client_credentials", "path": "/contoso-tenant-id/oauth2/v2.0/token",
         "time": request["time"]}
        for request in https_oauth2_server.token_requests
    ]  # fmt: skip
    assert https_oauth2_server.token_request_count == 2  # one per mailbox row
    assert [a.user for a in microsoft_smtp_server.auth_attempts if a.accepted] == addresses


def test_app_only_scope_follows_scopes_for_national_clouds(microsoft_settings, https_oauth2_server):
    microsoft_settings.update(
        APP_ONLY=True, TENANT="t1", SCOPES=["https://outlook.office365.us/.default"]
    )
    result = MicrosoftProvider(microsoft_settings).refresh_access_token(SENDER, None)
    assert result.scopes == ("https://outlook.office365.us/.default",)  # what was granted


@pytest.mark.parametrize(
    "change", [{"TENANT": "common"}, {"TENANT": "organizations"}, {"CLIENT_SECRET": ""}]
)
def test_app_only_needs_a_tenant_and_a_secret(change, microsoft_settings):
    provider = MicrosoftProvider({**microsoft_settings, "APP_ONLY": True, "TENANT": "t1", **change})
    with pytest.raises(ConfigurationError, match="APP_ONLY.*one tenant"):
        provider.refresh_access_token(SENDER, None)


# Consent ----------------------------------------------------------------------


def test_authorization_url(microsoft_settings, https_oauth2_server):
    pkce, state = make_pkce_pair(), make_state()
    url = MicrosoftProvider(microsoft_settings).authorization_url(
        redirect_uri=REDIRECT_URI, state=state, code_challenge=pkce.challenge
    )

    assert url.startswith(f"{https_oauth2_server.base_url}/common/oauth2/v2.0/authorize?")
    params = {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}
    assert params == {
        "client_id": "test-client",
        "response_type": "code",
        "response_mode": "query",
        "redirect_uri": REDIRECT_URI,
        "scope": f"{SMTP_SEND} email offline_access openid profile",
        "state": state,
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
        "prompt": "select_account",
    }


@pytest.mark.parametrize("client", ["confidential", "public"])
def test_consent_then_send(
    client, real_backend, microsoft_settings, https_oauth2_server, tls_certificate,
    microsoft_smtp_server,
):  # fmt: skip
    if client == "public":  # a "Mobile and desktop" registration: PKCE, no secret
        microsoft_settings.update(CLIENT_ID=PUBLIC_CLIENT_ID, CLIENT_SECRET="")
    provider, pkce, state = MicrosoftProvider(microsoft_settings), make_pkce_pair(), make_state()
    url = provider.authorization_url(
        redirect_uri=REDIRECT_URI, state=state, code_challenge=pkce.challenge, login_hint=SENDER
    )
    assert "prompt=" not in url and "login_hint=" in url
    answer = approve(url, SENDER, verify=tls_certificate[0])
    assert answer["state"] == state

    result = provider.exchange_code(
        code=answer["code"], redirect_uri=REDIRECT_URI, code_verifier=pkce.verifier
    )

    assert result.email == SENDER and result.refresh_token
    save_consent("microsoft", result, SENDER)
    assert mail.send_mail("Hi", "Body", SENDER, ["to@example.org"]) == 1
    assert https_oauth2_server.token_request_count == 1


def test_code_for_a_desktop_redirect_is_redeemed_as_a_public_client(
    microsoft_settings, https_oauth2_server, tls_certificate
):
    # A code sent to a "Mobile and desktop" redirect URI (connect_mailbox --loopback)
    # belongs to the public client: Entra refuses the secret with AADSTS700025.
    microsoft_settings.update(CLIENT_ID=PUBLIC_CLIENT_ID, CLIENT_SECRET="web-flow-secret")
    provider, pkce = MicrosoftProvider(microsoft_settings), make_pkce_pair()
    url = provider.authorization_url(
        redirect_uri=REDIRECT_URI, state="s", code_challenge=pkce.challenge
    )
    code = approve(url, SENDER, verify=tls_certificate[0])["code"]
    https_oauth2_server.fail_next_token_requests(1, **PUBLIC_CLIENT_REFUSAL)

    result = provider.exchange_code(
        code=code, redirect_uri=REDIRECT_URI, code_verifier=pkce.verifier
    )

    assert result.email == SENDER and https_oauth2_server.token_request_count == 2


def test_exchange_with_the_wrong_verifier_is_refused(microsoft_settings, tls_certificate):
    provider, pkce = MicrosoftProvider(microsoft_settings), make_pkce_pair()
    url = provider.authorization_url(
        redirect_uri=REDIRECT_URI, state="s", code_challenge=pkce.challenge
    )
    code = approve(url, SENDER, verify=tls_certificate[0])["code"]

    with pytest.raises(GrantRevoked, match="PKCE"):
        provider.exchange_code(
            code=code, redirect_uri=REDIRECT_URI, code_verifier=make_pkce_pair().verifier
        )


# Device code flow (against a stand-in: the dev OAuth2Server has none yet) --------


@pytest.fixture
def device_settings(microsoft_settings, device_flow_server):
    microsoft_settings.update(
        CLIENT_ID=PUBLIC_CLIENT_ID, CLIENT_SECRET="", AUTHORITY_HOST=device_flow_server.base_url
    )
    return microsoft_settings


def test_device_flow(device_settings, device_flow_server, real_backend, microsoft_smtp_server):
    provider = MicrosoftProvider(device_settings)

    flow = provider.start_device_flow()

    assert provider.supports_device_flow
    assert (flow.user_code, flow.verification_uri) == (
        "ABCD-EFGH", "https://microsoft.com/devicelogin",
    )  # fmt: skip
    assert "ABCD-EFGH" in flow.message and flow.expires_at.timestamp() > time.time() + 800
    assert set(device_flow_server.requested_scope.split()) == {
        SMTP_SEND, "email", "offline_access", "openid", "profile",
    }  # fmt: skip
    device_flow_server.approve(SENDER)
    result = provider.finish_device_flow(flow, timeout=10)

    assert result.email == SENDER and result.refresh_token
    save_consent("microsoft", result, None)
    assert mail.send_mail("Hi", "Body", SENDER, ["to@example.org"]) == 1


@pytest.mark.slow
def test_device_flow_waits_for_the_person(device_settings, device_flow_server):
    provider = MicrosoftProvider(device_settings)
    flow = provider.start_device_flow()

    started = time.monotonic()
    with pytest.raises(DeviceFlowExpired, match="nobody entered the code ABCD-EFGH"):
        provider.finish_device_flow(flow, timeout=1.5)

    assert 1.0 < time.monotonic() - started < 5
    assert device_flow_server.polls >= 2  # msal polled at the server's interval


def test_device_flow_declined(device_settings, device_flow_server):
    provider = MicrosoftProvider(device_settings)
    flow = provider.start_device_flow()
    device_flow_server.decline()

    with pytest.raises(DeviceFlowDenied, match="authorization_declined"):
        provider.finish_device_flow(flow, timeout=10)


def test_device_flow_refused_says_to_allow_public_client_flows(microsoft_settings):
    # The dev OAuth2Server answers its device endpoint with invalid_request, like an app
    # registration without "Allow public client flows".
    with pytest.raises(TokenEndpointError, match="Allow public client flows"):
        MicrosoftProvider(microsoft_settings).start_device_flow()


def test_no_revocation(microsoft_settings):
    assert MicrosoftProvider(microsoft_settings).revoke_token("token") is False


def test_missing_discovery_document_fails_clearly(microsoft_settings, https_oauth2_server):
    # As for an unknown tenant, whose discovery document Microsoft answers with a 4xx.
    microsoft_settings["AUTHORITY_HOST"] = f"{https_oauth2_server.base_url}/no-such-prefix"
    with pytest.raises(TokenEndpointError, match="cannot be used.*TENANT and AUTHORITY_HOST"):
        MicrosoftProvider(microsoft_settings).refresh_access_token(SENDER, "any")


def test_microsoft_caps_concurrent_sessions_per_mailbox():
    from django_xoauth2_mail.providers.microsoft import MicrosoftProvider

    # Exchange Online refuses a 4th concurrent SMTP session per mailbox.
    assert MicrosoftProvider.max_sessions_per_mailbox == 3
