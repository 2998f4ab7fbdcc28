"""device_grant.py, the RFC 8628 client, against the dev OAuth2 server's device endpoint."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket

import pytest
from django.utils import timezone

from django_xoauth2_mail.exceptions import ConfigurationError
from django_xoauth2_mail.providers import base, device_grant
from django_xoauth2_mail.providers.base import TokenEndpointError
from django_xoauth2_mail.testing import OAuth2Server
from django_xoauth2_mail.testing.fixtures import TEST_CLIENT_ID, TEST_CLIENT_SECRET
from tests.clocks import VirtualClock

AUTH = {"client_id": TEST_CLIENT_ID, "client_secret": TEST_CLIENT_SECRET}
SCOPES = ["openid", "email", "https://mail.google.com/"]
EMAIL = "user@example.com"


@pytest.fixture
def server(oauth2_server: OAuth2Server) -> OAuth2Server:
    oauth2_server.device_code_interval = 1
    return oauth2_server


def test_approved(server):
    flow = device_grant.start(server.device_authorization_url, SCOPES, AUTH)
    assert flow.verification_uri == server.device_verification_url
    assert flow.message == f"To sign in, open {flow.verification_uri} and enter the code " + (
        f"{flow.user_code}."
    )
    assert flow.state["interval"] == 1.0
    assert flow.state["verification_uri_complete"].endswith(flow.user_code)
    assert 590 < (flow.expires_at - timezone.now()).total_seconds() <= 600
    assert "device_code" not in repr(flow)  # DeviceFlow.state is kept out of reprs

    server.approve_device_code(flow.user_code, EMAIL)
    clock = VirtualClock()
    payload = device_grant.poll(server.token_url, flow, AUTH, timeout=10, clock=clock)
    assert clock.sleeps == [1.0]  # the server's interval, before the first request
    result = device_grant.consent_result(payload, EMAIL)

    assert server.validate_access_token(EMAIL, result.access_token)
    assert result.refresh_token and result.email == EMAIL
    assert result.scopes == tuple(SCOPES)
    assert [r["grant_type"] for r in server.token_requests] == [device_grant.GRANT_TYPE]


def test_denied(server):
    flow = device_grant.start(server.device_authorization_url, SCOPES, AUTH)
    server.deny_device_code(flow.user_code)
    with pytest.raises(base.DeviceFlowDenied, match="refused .+ \\(access_denied\\)"):
        device_grant.poll(server.token_url, flow, AUTH, timeout=10, clock=VirtualClock())


def test_our_timeout(server):
    flow = device_grant.start(server.device_authorization_url, SCOPES, AUTH)
    clock = VirtualClock()
    with pytest.raises(base.DeviceFlowExpired, match="nobody entered the code") as caught:
        device_grant.poll(server.token_url, flow, AUTH, timeout=1.5, clock=clock)
    assert not caught.value.retryable
    assert server.token_request_count == 1  # it polled at the interval, then gave up
    assert clock.sleeps == [1.0]  # a second wait would end past the 1.5 s


def test_slow_down_adds_five_seconds_for_good(server):
    """RFC 8628 section 3.5. On a virtual clock every poll reaches the server at once,
    so from the second one on the server asks to slow down, each time by 5 s more."""
    flow = device_grant.start(server.device_authorization_url, SCOPES, AUTH)
    clock = VirtualClock()
    with pytest.raises(base.DeviceFlowExpired):
        device_grant.poll(server.token_url, flow, AUTH, timeout=20, clock=clock)
    assert clock.sleeps == [1.0, 1.0, 6.0, 11.0]  # the next, 16 s, would end past 20 s
    assert server.token_request_count == 4


@pytest.mark.slow
def test_the_servers_expired_token(server):
    server.device_code_interval, server.device_code_lifetime = 2, 1
    flow = device_grant.start(server.device_authorization_url, SCOPES, AUTH)
    # Our own clock would stop first; pretend the code lasts longer to hear the server.
    later = dataclasses.replace(flow, expires_at=timezone.now() + dt.timedelta(minutes=1))
    with pytest.raises(base.DeviceFlowExpired):
        device_grant.poll(server.token_url, later, AUTH, timeout=10)
    assert server.token_request_count == 1


def test_unreachable_token_endpoint_backs_off_until_the_deadline(server):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{closed.getsockname()[1]}/token"
    flow = device_grant.start(server.device_authorization_url, SCOPES, AUTH)
    clock = VirtualClock()
    with pytest.raises(base.DeviceFlowExpired):
        device_grant.poll(dead_url, flow, AUTH, timeout=7.5, clock=clock)
    assert clock.sleeps == [1.0, 2.0, 4.0]  # doubled after each failure; 8 s would pass 7.5


def test_other_refusals_stop_polling(server):
    flow = device_grant.start(server.device_authorization_url, SCOPES, AUTH)
    wrong = {"client_id": TEST_CLIENT_ID, "client_secret": "wrong"}
    with pytest.raises(TokenEndpointError, match="refused the device code \\(invalid_client"):
        device_grant.poll(server.token_url, flow, wrong, timeout=10, clock=VirtualClock())


def test_start_failures(server):
    with pytest.raises(ConfigurationError, match="DEVICE_AUTHORIZATION_URL"):
        device_grant.start("", SCOPES, AUTH)
    with pytest.raises(TokenEndpointError, match="did not start a device flow \\(invalid_client"):
        device_grant.start(server.device_authorization_url, SCOPES, {"client_id": "nobody"})
    with pytest.raises(TokenEndpointError, match="not a JSON object") as caught:
        device_grant.start(server.authorization_url, SCOPES, AUTH)  # an HTML page
    assert "test-secret" not in str(caught.value)


def test_a_zero_interval_is_not_a_busy_loop(server):
    server.device_code_interval = 0
    flow = device_grant.start(server.device_authorization_url, SCOPES, AUTH)
    assert flow.state["interval"] == device_grant.MIN_INTERVAL
