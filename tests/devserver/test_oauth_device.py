"""The development OAuth2 server's device authorization grant (RFC 8628), over real HTTP."""

from __future__ import annotations

import html
import re
import time
from typing import Any

import msal
import pytest
import requests

from django_xoauth2_mail.devserver.oauth import OAuth2Server

CLIENT = ("test-client", "test-secret")
EMAIL = "user@example.com"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class TrustingSession(requests.Session):
    """msal's ``verify=`` loses to REQUESTS_CA_BUNDLE (psf/requests#3829): pin it per request."""

    def __init__(self, ca_file: str) -> None:
        super().__init__()
        self.ca_file = ca_file

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        return super().request(*args, **{**kwargs, "verify": self.ca_file})


def msal_app(server: OAuth2Server, tenant: str, ca_file: str) -> msal.PublicClientApplication:
    return msal.PublicClientApplication(
        "public-client",
        authority=server.authority_url(tenant),
        instance_discovery=False,
        http_client=TrustingSession(ca_file),
    )


def start(server: OAuth2Server, scope: str = "openid email https://mail.google.com/") -> Any:
    response = requests.post(
        server.device_authorization_url,
        data={"client_id": CLIENT[0], "client_secret": CLIENT[1], "scope": scope},
        timeout=5,
    )
    assert response.status_code == 200, response.text
    return response.json()


def poll(server: OAuth2Server, device_code: str, client: tuple[str, str] = CLIENT) -> Any:
    form = {"grant_type": DEVICE_GRANT, "device_code": device_code}
    form.update(client_id=client[0], client_secret=client[1])
    return requests.post(server.token_url, data=form, timeout=5)


def assert_error(response: requests.Response, error: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"] == error


def submit_page(server: OAuth2Server, **form: str) -> requests.Response:
    return requests.post(server.device_verification_url, data=form, timeout=5)


def test_device_authorization_response(oauth2_server):
    flow = start(oauth2_server)
    assert set(flow) >= {"device_code", "user_code", "verification_uri", "expires_in", "interval"}
    assert re.fullmatch(r"[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}", flow["user_code"])
    assert flow["verification_uri"] == oauth2_server.device_verification_url
    assert flow["verification_uri_complete"].endswith(f"?user_code={flow['user_code']}")
    assert (flow["expires_in"], flow["interval"]) == (600, 5)
    assert flow["user_code"] in flow["message"]


def test_person_allows_on_the_verification_page(oauth2_server):
    flow = start(oauth2_server)
    page = requests.get(flow["verification_uri_complete"], timeout=5)
    assert page.status_code == 200
    assert f"value='{flow['user_code']}'" in page.text
    assert ">Allow</button>" in page.text and ">Deny</button>" in page.text
    # People type codes as they like: lower case, no dash.
    typed = flow["user_code"].replace("-", "").lower()
    answer = submit_page(oauth2_server, user_code=typed, email=EMAIL, decision="allow")
    assert answer.status_code == 200
    assert "You can close this tab" in answer.text

    tokens = poll(oauth2_server, flow["device_code"])
    assert tokens.status_code == 200, tokens.text
    body = tokens.json()
    assert oauth2_server.validate_access_token(EMAIL, body["access_token"])
    assert body["refresh_token"] and body["id_token"]
    # A device code is spent by its first successful use.
    assert_error(poll(oauth2_server, flow["device_code"]), "invalid_grant")


def test_pending_until_decided_then_slow_down_when_polling_too_fast(oauth2_server):
    flow = start(oauth2_server)
    assert_error(poll(oauth2_server, flow["device_code"]), "authorization_pending")
    assert_error(poll(oauth2_server, flow["device_code"]), "slow_down")
    # slow_down adds 5 seconds for good (RFC 8628 section 3.5): still too fast now.
    assert_error(poll(oauth2_server, flow["device_code"]), "slow_down")


@pytest.mark.slow
def test_polling_at_the_interval_is_not_slowed_down(oauth2_server):
    oauth2_server.device_code_interval = 1
    flow = start(oauth2_server)
    assert flow["interval"] == 1
    assert_error(poll(oauth2_server, flow["device_code"]), "authorization_pending")
    time.sleep(1)
    assert_error(poll(oauth2_server, flow["device_code"]), "authorization_pending")


def test_person_denies_on_the_page(oauth2_server):
    flow = start(oauth2_server)
    answer = submit_page(oauth2_server, user_code=flow["user_code"], decision="deny")
    assert answer.status_code == 200 and "You denied access" in answer.text
    assert_error(poll(oauth2_server, flow["device_code"]), "access_denied")
    # Decided codes cannot be decided again, nor redeemed.
    assert not oauth2_server.approve_device_code(flow["user_code"], EMAIL)
    assert_error(poll(oauth2_server, flow["device_code"]), "invalid_grant")


def test_test_controls_approve_and_deny(oauth2_server):
    allowed, denied = start(oauth2_server, scope="https://mail.google.com/"), start(oauth2_server)
    assert oauth2_server.approve_device_code(allowed["user_code"], EMAIL)
    assert oauth2_server.deny_device_code(denied["user_code"])
    body = poll(oauth2_server, allowed["device_code"]).json()
    assert body["scope"] == "https://mail.google.com/"
    assert "id_token" not in body  # no openid/email scope asked
    assert_error(poll(oauth2_server, denied["device_code"]), "access_denied")
    assert not oauth2_server.deny_device_code("BCDF-GHJK")


@pytest.mark.slow
def test_expired_device_code(oauth2_server):
    oauth2_server.device_code_lifetime = 1
    flow = start(oauth2_server)
    time.sleep(1.1)
    page = submit_page(oauth2_server, user_code=flow["user_code"], email=EMAIL, decision="allow")
    assert page.status_code == 400 and "unknown, expired or already used" in page.text
    assert not oauth2_server.approve_device_code(flow["user_code"], EMAIL)
    assert_error(poll(oauth2_server, flow["device_code"]), "expired_token")


def test_verification_page_problems(oauth2_server):
    flow = start(oauth2_server)
    no_email = submit_page(oauth2_server, user_code=flow["user_code"], decision="allow")
    assert no_email.status_code == 400 and "Enter the address." in no_email.text
    unknown = submit_page(oauth2_server, user_code="BBBB-BBBB", email=EMAIL, decision="allow")
    assert unknown.status_code == 400
    tricky = requests.get(
        oauth2_server.device_verification_url, params={"user_code": "<b>'"}, timeout=5
    )
    assert "<b>'" not in tricky.text and html.escape("<b>'") in tricky.text


def test_auto_approve_with_the_account_in_the_link():
    with OAuth2Server(auto_approve=True) as server:
        server.add_client(*CLIENT)
        flow = start(server)
        page = requests.get(flow["verification_uri_complete"] + f"&login_hint={EMAIL}", timeout=5)
        assert page.status_code == 200 and "Access allowed" in page.text
        assert poll(server, flow["device_code"]).status_code == 200


def test_request_errors(oauth2_server):
    assert_error(requests.get(oauth2_server.device_authorization_url, timeout=5), "invalid_request")
    no_client = requests.post(oauth2_server.device_authorization_url, timeout=5)
    assert_error(no_client, "invalid_request")
    unknown_client = requests.post(
        oauth2_server.device_authorization_url, data={"client_id": "nobody"}, timeout=5
    )
    assert_error(unknown_client, "invalid_client", 401)
    assert_error(poll(oauth2_server, ""), "invalid_request")
    flow = start(oauth2_server)
    oauth2_server.add_client("other-client", "other-secret")
    assert_error(poll(oauth2_server, flow["device_code"], ("other-client", "other-secret")),
                 "invalid_grant")  # fmt: skip


def test_discovery_names_the_device_endpoint_and_grant(oauth2_server):
    document = requests.get(
        f"{oauth2_server.base_url}/.well-known/openid-configuration", timeout=5
    ).json()
    assert document["device_authorization_endpoint"] == oauth2_server.device_authorization_url
    assert DEVICE_GRANT in document["grant_types_supported"]


def test_msal_device_flow_through_the_tenant_alias(tls_certificate):
    """msal, the client Microsoft mailboxes use, runs the whole flow against the server."""
    certfile, keyfile = tls_certificate
    with OAuth2Server(certfile=certfile, keyfile=keyfile) as server:
        server.add_client("public-client", None)
        server.device_code_interval = 1
        app = msal_app(server, "common", certfile)
        flow = app.initiate_device_flow(scopes=["https://outlook.office.com/SMTP.Send"])
        assert flow["verification_uri"] == server.device_verification_url, flow
        assert server.approve_device_code(flow["user_code"], EMAIL)
        result = app.acquire_token_by_device_flow(flow)
        assert "access_token" in result, result
        assert result["id_token_claims"]["preferred_username"] == EMAIL
        assert server.validate_access_token(EMAIL, result["access_token"])
        devicecode_paths = [r["path"] for r in server.token_requests]
        assert devicecode_paths == ["/common/oauth2/v2.0/token"]


@pytest.mark.slow
@pytest.mark.parametrize("decision", ["deny", "expire"])
def test_msal_sees_the_refusal(tls_certificate, decision):
    certfile, keyfile = tls_certificate
    with OAuth2Server(certfile=certfile, keyfile=keyfile) as server:
        server.add_client("public-client", None)
        server.device_code_interval, server.device_code_lifetime = 1, 1
        app = msal_app(server, "contoso", certfile)
        flow = app.initiate_device_flow(scopes=["https://outlook.office.com/SMTP.Send"])
        if decision == "deny":
            server.deny_device_code(flow["user_code"])
        # msal's own clock would give up at the same moment; let the server say it.
        flow["expires_at"] = time.time() + 5
        result = app.acquire_token_by_device_flow(flow)
        assert result.get("error") == ("access_denied" if decision == "deny" else "expired_token")
