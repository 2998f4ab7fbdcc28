"""The development OAuth2 server, driven over real HTTP with requests."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import subprocess
import sys
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests

from django_xoauth2_mail.devserver.oauth import OAuth2Server

CLIENT = ("test-client", "test-secret")
REDIRECT_URI = "http://127.0.0.1:8765/callback"
EMAIL = "user@example.com"


def make_pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorize_params(challenge: str, **extra: str) -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": CLIENT[0],
        "redirect_uri": REDIRECT_URI,
        "scope": "openid email https://mail.google.com/",
        "state": "state-123",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }


def consent(server: OAuth2Server, challenge: str, decision: str = "allow") -> dict[str, str]:
    """GET the consent page, submit it like a browser, return the redirect's query."""
    page = requests.get(server.authorization_url, params=authorize_params(challenge), timeout=5)
    assert page.status_code == 200
    assert "test-client" in page.text and "https://mail.google.com/" in page.text
    assert ">Allow</button>" in page.text and ">Deny</button>" in page.text
    form = {name: html.unescape(value) for name, value in re.findall(
        r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page.text
    )}  # fmt: skip
    form.update(email=EMAIL, decision=decision)
    answer = requests.post(server.authorization_url, data=form, allow_redirects=False, timeout=5)
    assert answer.status_code == 302
    location = answer.headers["Location"]
    assert location.startswith(REDIRECT_URI + "?")
    return dict(parse_qsl(urlsplit(location).query))


def token(server: OAuth2Server, auth: Any = None, **form: str) -> requests.Response:
    if auth is None:
        form = {"client_id": CLIENT[0], "client_secret": CLIENT[1], **form}
    return requests.post(server.token_url, data=form, auth=auth, timeout=5)


def exchange(server: OAuth2Server, code: str, verifier: str) -> requests.Response:
    return token(
        server,
        grant_type="authorization_code",
        code=code,
        redirect_uri=REDIRECT_URI,
        code_verifier=verifier,
    )


def assert_oauth_error(response: requests.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"] == error


def jwt_claims(token_value: str) -> dict[str, Any]:
    header, payload, signature = token_value.split(".")
    assert signature == ""
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "none", "typ": "JWT"}
    return json.loads(base64.urlsafe_b64decode(payload + "=="))  # type: ignore[no-any-return]


def test_authorization_code_with_pkce(oauth2_server):
    verifier, challenge = make_pkce()
    query = consent(oauth2_server, challenge)
    assert query["state"] == "state-123"

    response = exchange(oauth2_server, query["code"], verifier)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["scope"] == "openid email https://mail.google.com/"
    assert body["refresh_token"] and "email" not in body
    claims = jwt_claims(body["id_token"])
    assert claims["email"] == EMAIL and claims["aud"] == "test-client"
    assert claims["iss"] == oauth2_server.base_url and claims["exp"] > claims["iat"]
    assert oauth2_server.validate_access_token(EMAIL, body["access_token"])
    assert not oauth2_server.validate_access_token("other@example.com", body["access_token"])
    userinfo = requests.get(
        oauth2_server.userinfo_url,
        headers={"Authorization": f"Bearer {body['access_token']}"},
        timeout=5,
    )
    assert userinfo.json() == {"email": EMAIL, "sub": claims["sub"]}


def test_no_id_token_without_openid_or_email_scope(oauth2_server):
    verifier, challenge = make_pkce()
    params = authorize_params(challenge, scope="https://mail.google.com/", login_hint=EMAIL)
    oauth2_server.auto_approve = True
    answer = requests.get(
        oauth2_server.authorization_url, params=params, allow_redirects=False, timeout=5
    )
    assert answer.status_code == 302  # auto_approve skipped the page
    code = dict(parse_qsl(urlsplit(answer.headers["Location"]).query))["code"]

    body = exchange(oauth2_server, code, verifier).json()

    assert "id_token" not in body and body["refresh_token"]


def test_wrong_pkce_verifier_is_refused(oauth2_server):
    _, challenge = make_pkce()
    code = consent(oauth2_server, challenge)["code"]
    response = exchange(oauth2_server, code, make_pkce()[0])
    assert_oauth_error(response, 400, "invalid_grant")


def test_code_is_single_use(oauth2_server):
    verifier, challenge = make_pkce()
    code = consent(oauth2_server, challenge)["code"]
    assert exchange(oauth2_server, code, verifier).status_code == 200
    assert_oauth_error(exchange(oauth2_server, code, verifier), 400, "invalid_grant")


def test_denied_consent_redirects_with_access_denied(oauth2_server):
    query = consent(oauth2_server, make_pkce()[1], decision="deny")
    assert query == {"error": "access_denied", "state": "state-123", "iss": oauth2_server.base_url}


def test_every_authorization_response_names_the_server(oauth2_server):
    # RFC 9207, announced in the metadata; clients check it against mix-up attacks.
    assert consent(oauth2_server, make_pkce()[1])["iss"] == oauth2_server.base_url
    refused = requests.get(
        oauth2_server.authorization_url,
        params={**authorize_params(make_pkce()[1]), "code_challenge_method": "plain"},
        allow_redirects=False,
        timeout=5,
    )
    assert dict(parse_qsl(urlsplit(refused.headers["Location"]).query))["iss"] == (
        oauth2_server.base_url
    )
    document = requests.get(f"{oauth2_server.base_url}/.well-known/openid-configuration", timeout=5)
    assert document.json()["authorization_response_iss_parameter_supported"] is True


@pytest.mark.parametrize(
    "override",
    [{"code_challenge_method": "plain"}, {"code_challenge": ""}, {"response_type": "token"}],
)
def test_bad_authorization_requests_redirect_with_an_error(oauth2_server, override):
    params = {**authorize_params(make_pkce()[1]), **override}
    answer = requests.get(
        oauth2_server.authorization_url, params=params, allow_redirects=False, timeout=5
    )
    assert answer.status_code == 302
    query = dict(parse_qsl(urlsplit(answer.headers["Location"]).query))
    assert query["error"] in ("invalid_request", "unsupported_response_type")
    assert query["state"] == "state-123"


@pytest.mark.parametrize(
    "override",
    [{"client_id": "nobody"}, {"redirect_uri": "https://evil.example.com/cb"}],
)
def test_bad_client_or_redirect_never_redirects(oauth2_server, override):
    params = {**authorize_params(make_pkce()[1]), **override}
    answer = requests.get(
        oauth2_server.authorization_url, params=params, allow_redirects=False, timeout=5
    )
    assert answer.status_code == 400
    assert "Location" not in answer.headers
    assert answer.headers["Content-Type"].startswith("text/html")


def test_registered_redirect_uris_are_enforced(oauth2_server):
    oauth2_server.add_client("strict", "s", redirect_uris=["http://127.0.0.1:9/registered"])
    params = {**authorize_params(make_pkce()[1]), "client_id": "strict"}
    answer = requests.get(oauth2_server.authorization_url, params=params, timeout=5)
    assert answer.status_code == 400  # REDIRECT_URI is loopback but not registered


def test_refresh_rotates_and_invalidates_the_old_token(oauth2_server):
    issued = oauth2_server.issue_tokens(EMAIL)

    first = token(oauth2_server, grant_type="refresh_token", refresh_token=issued["refresh_token"])

    assert first.status_code == 200, first.text
    rotated = first.json()
    assert rotated["refresh_token"] != issued["refresh_token"]
    assert oauth2_server.validate_access_token(EMAIL, rotated["access_token"])
    stale = token(oauth2_server, grant_type="refresh_token", refresh_token=issued["refresh_token"])
    assert_oauth_error(stale, 400, "invalid_grant")
    fresh = token(oauth2_server, grant_type="refresh_token", refresh_token=rotated["refresh_token"])
    assert fresh.status_code == 200
    assert [r["grant_type"] for r in oauth2_server.token_requests] == ["refresh_token"] * 3
    assert oauth2_server.token_request_count == 3


def test_refresh_without_rotation_keeps_the_refresh_token():
    with OAuth2Server(rotate_refresh_tokens=False) as server:
        server.add_client(*CLIENT)
        issued = server.issue_tokens(EMAIL)
        for _ in range(2):
            response = token(
                server, grant_type="refresh_token", refresh_token=issued["refresh_token"]
            )
            assert response.status_code == 200
            assert "refresh_token" not in response.json()


def test_refresh_token_is_bound_to_its_client(oauth2_server):
    oauth2_server.add_client("other-client", "other-secret")
    issued = oauth2_server.issue_tokens(EMAIL, client_id="other-client")
    response = token(
        oauth2_server, grant_type="refresh_token", refresh_token=issued["refresh_token"]
    )
    assert_oauth_error(response, 400, "invalid_grant")


def test_revoked_refresh_token_gives_invalid_grant(oauth2_server):
    issued = oauth2_server.issue_tokens(EMAIL)

    revoked = requests.post(
        oauth2_server.revocation_url, data={"token": issued["refresh_token"]}, timeout=5
    )

    assert revoked.status_code == 200
    response = token(
        oauth2_server, grant_type="refresh_token", refresh_token=issued["refresh_token"]
    )
    assert_oauth_error(response, 400, "invalid_grant")
    assert not oauth2_server.validate_access_token(EMAIL, issued["access_token"])
    unknown = requests.post(oauth2_server.revocation_url, data={"token": "nope"}, timeout=5)
    assert unknown.status_code == 200


def test_expired_access_token_is_rejected(oauth2_server):
    issued = oauth2_server.issue_tokens(EMAIL)
    assert oauth2_server.validate_access_token(EMAIL, issued["access_token"])

    oauth2_server.expire_access_tokens()

    assert not oauth2_server.validate_access_token(EMAIL, issued["access_token"])
    userinfo = requests.get(
        oauth2_server.userinfo_url,
        headers={"Authorization": f"Bearer {issued['access_token']}"},
        timeout=5,
    )
    assert userinfo.status_code == 401
    oauth2_server.set_access_token_lifetime(120)
    assert oauth2_server.issue_tokens(EMAIL)["expires_in"] == 120


def test_client_credentials_token_is_not_bound_to_a_user(oauth2_server):
    response = token(oauth2_server, grant_type="client_credentials", scope="https://x/.default")

    assert response.status_code == 200, response.text
    body = response.json()
    assert "refresh_token" not in body and "id_token" not in body
    assert oauth2_server.validate_access_token("anyone@example.com", body["access_token"])
    assert oauth2_server.token_requests[-1]["grant_type"] == "client_credentials"


def test_http_basic_client_authentication(oauth2_server):
    oauth2_server.add_client("basic-client", "p+ss:word")
    issued = oauth2_server.issue_tokens(EMAIL)
    response = token(
        oauth2_server,
        auth=("basic-client", "p+ss:word"),
        grant_type="refresh_token",
        refresh_token=issued["refresh_token"],
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("auth", "form"),
    [
        (None, {"client_id": "test-client", "client_secret": "wrong"}),
        (None, {"client_id": "nobody", "client_secret": "test-secret"}),
        (("test-client", "wrong"), {}),
    ],
)
def test_wrong_client_credentials_give_invalid_client(oauth2_server, auth, form):
    response = requests.post(
        oauth2_server.token_url,
        data={"grant_type": "client_credentials", **form},
        auth=auth,
        timeout=5,
    )
    assert_oauth_error(response, 401, "invalid_client")


def test_request_errors(oauth2_server):
    assert_oauth_error(token(oauth2_server, grant_type="password"), 400, "unsupported_grant_type")
    assert_oauth_error(token(oauth2_server), 400, "invalid_request")
    assert_oauth_error(token(oauth2_server, grant_type="refresh_token"), 400, "invalid_request")
    repeated = requests.post(
        oauth2_server.token_url, data=[("grant_type", "a"), ("grant_type", "b")], timeout=5
    )
    assert_oauth_error(repeated, 400, "invalid_request")
    assert requests.get(oauth2_server.token_url, timeout=5).status_code == 400


def test_fail_next_token_requests_injects_raw_responses(oauth2_server):
    issued = oauth2_server.issue_tokens(EMAIL)
    oauth2_server.fail_next_token_requests(2)
    oauth2_server.fail_next_token_requests(1, 200, b"not json", "application/json")
    refresh = {"grant_type": "refresh_token", "refresh_token": issued["refresh_token"]}

    answers = [token(oauth2_server, **refresh) for _ in range(4)]

    assert [a.status_code for a in answers] == [503, 503, 200, 200]
    assert answers[0].headers["Content-Type"] == "text/html"
    assert b"503" in answers[0].content
    assert answers[2].content == b"not json"
    assert answers[3].json()["access_token"]
    assert oauth2_server.token_request_count == 4


def test_token_response_delay(oauth2_server):
    oauth2_server.token_response_delay = 0.5
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(oauth2_server.token_url, data={"grant_type": "x"}, timeout=0.1)


def test_state_file_keeps_clients_and_tokens_across_restart(tmp_path):
    state_file = tmp_path / "state" / "oauth2.json"
    with OAuth2Server(state_file=state_file) as first:
        first.add_client(*CLIENT)
        issued = first.issue_tokens(EMAIL)
        refreshed = token(first, grant_type="refresh_token", refresh_token=issued["refresh_token"])
    rotated = refreshed.json()
    assert json.loads(state_file.read_text())["version"] == 1
    assert [p.name for p in state_file.parent.iterdir()] == ["oauth2.json"]  # no temp files

    with OAuth2Server(state_file=state_file) as second:
        assert second.validate_access_token(EMAIL, rotated["access_token"])
        stale = token(second, grant_type="refresh_token", refresh_token=issued["refresh_token"])
        assert_oauth_error(stale, 400, "invalid_grant")
        again = token(second, grant_type="refresh_token", refresh_token=rotated["refresh_token"])
        assert again.status_code == 200, again.text


def test_corrupt_state_file_is_reported(tmp_path):
    state_file = tmp_path / "oauth2.json"
    state_file.write_text("{not json")
    with pytest.raises(ValueError, match="Delete it"):
        OAuth2Server(state_file=state_file)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com", ""])
def test_non_loopback_host_is_refused(host):
    with pytest.raises(ValueError, match="allow_non_loopback=True"):
        OAuth2Server(host=host)
    OAuth2Server(host=host, allow_non_loopback=True)  # constructed, never started


def test_ipv6_loopback():
    server = OAuth2Server(host="::1")
    try:
        server.start()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert server.base_url.startswith("http://[::1]:")
        answer = requests.get(f"{server.base_url}/.well-known/openid-configuration", timeout=5)
        assert answer.json()["token_endpoint"] == server.token_url
    finally:
        server.stop()


def test_https_with_tenant_discovery_and_aliases(tls_certificate):
    certfile, keyfile = tls_certificate
    with OAuth2Server(certfile=certfile, keyfile=keyfile) as server:
        server.add_client(*CLIENT)
        assert server.base_url.startswith("https://127.0.0.1:")
        discovery_url = f"{server.authority_url('my-tenant')}/v2.0/.well-known/openid-configuration"

        document = requests.get(discovery_url, verify=certfile, timeout=5).json()

        prefix = f"{server.base_url}/my-tenant/oauth2/v2.0"
        assert document["token_endpoint"] == f"{prefix}/token"
        assert document["authorization_endpoint"] == f"{prefix}/authorize"
        assert document["device_authorization_endpoint"] == f"{prefix}/devicecode"
        assert document["issuer"] == f"{server.base_url}/my-tenant/v2.0"
        answer = requests.post(
            document["token_endpoint"],
            data={"grant_type": "client_credentials"},
            auth=CLIENT,
            verify=certfile,
            timeout=5,
        )
        assert answer.status_code == 200, answer.text
        device = requests.post(
            document["device_authorization_endpoint"], verify=certfile, timeout=5
        )
        assert_oauth_error(device, 400, "invalid_request")
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(discovery_url, timeout=5)  # the system CAs do not know this certificate


def test_requests_are_not_logged_unless_verbose(capfd):
    with OAuth2Server() as quiet:
        requests.get(f"{quiet.base_url}/.well-known/openid-configuration", timeout=5)
    assert capfd.readouterr().err == ""
    with OAuth2Server(verbose=True) as chatty:
        requests.get(f"{chatty.base_url}/.well-known/openid-configuration", timeout=5)
    assert "openid-configuration" in capfd.readouterr().err


def test_testing_package_does_not_import_pytest():
    code = "import sys, django_xoauth2_mail.testing; print('pytest' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.strip() == "False"


def test_publishes_rfc_8414_and_openid_metadata_for_an_issuer_with_a_path():
    with OAuth2Server(issuer_path="/realms/mail") as server:
        base = server.base_url
        rfc8414 = requests.get(f"{base}/.well-known/oauth-authorization-server/realms/mail")
        oidc = requests.get(f"{base}/realms/mail/.well-known/openid-configuration")
        misplaced = requests.get(f"{base}/realms/mail/.well-known/oauth-authorization-server")
        root = requests.get(f"{base}/.well-known/openid-configuration")

        server.metadata_documents = {"openid-configuration"}
        server.metadata_changes = {"openid-configuration": {"userinfo_endpoint": None}}
        withdrawn = requests.get(server.metadata_url("oauth-authorization-server"))
        changed = requests.get(server.metadata_url("openid-configuration")).json()

    for response in (rfc8414, oidc):
        document = response.json()
        assert document["issuer"] == f"{base}/realms/mail" == server.issuer
        assert document["token_endpoint"] == server.token_url
        assert document["code_challenge_methods_supported"] == ["S256"]
    assert misplaced.status_code == root.status_code == withdrawn.status_code == 404
    assert "userinfo_endpoint" not in changed and changed["revocation_endpoint"]
    assert server.metadata_requests[0] == "/.well-known/oauth-authorization-server/realms/mail"
