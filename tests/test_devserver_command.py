"""``manage.py xoauth2_devserver``: both servers, driven over real HTTP and SMTP.

Most tests run the command in a thread (fast, and ``settings`` overrides reach it); the
ones about signals, exit codes and restarts run it as a real subprocess.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
from django.core.management import call_command

from django_xoauth2_mail.consent.flows import make_pkce_pair
from django_xoauth2_mail.management.commands.xoauth2_devserver import Command

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ("dev-client", "dev-secret")
REDIRECT_URI = "http://127.0.0.1:9/callback"  # never contacted: redirects are not followed
EMAIL = "dev@example.com"
SCOPE = "openid email https://mail.google.com/"


@dataclass
class Devserver:
    command: Command
    stdout: io.StringIO
    stderr: io.StringIO
    maildir: Path

    @property
    def base_url(self) -> str:
        assert self.command.servers is not None
        return self.command.servers[0].base_url

    @property
    def smtp_port(self) -> int:
        assert self.command.servers is not None
        return self.command.servers[1].port

    def wait_for_output(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.stdout.getvalue():
            assert time.monotonic() < deadline, f"{text!r} not in:\n{self.stdout.getvalue()}"
            time.sleep(0.02)
        return self.stdout.getvalue()


@contextlib.contextmanager
def running_devserver(tmp_path: Path, *args: str) -> Iterator[Devserver]:
    """The command in a thread, on free ports, until the block ends."""
    stdout, stderr = io.StringIO(), io.StringIO()
    command = Command(stdout=stdout, stderr=stderr)
    maildir = tmp_path / "mail"
    options = ["--oauth-port", "0", "--smtp-port", "0", "--maildir", str(maildir), *args]
    failures: list[BaseException] = []

    def run() -> None:
        try:
            call_command(command, *options)
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started = command.ready.wait(10)
    try:
        assert started, f"not started: {failures} {stdout.getvalue()} {stderr.getvalue()}"
        yield Devserver(command, stdout, stderr, maildir)
    finally:
        command.stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert not failures, failures
    assert stdout.getvalue().rstrip().endswith("Stopped.")


@pytest.fixture
def devserver(tmp_path: Path) -> Iterator[Devserver]:
    with running_devserver(tmp_path) as server:
        yield server


def authorize_params(challenge: str, **extra: str) -> dict[str, str]:
    return {
        "response_type": "code",
        "client_id": CLIENT[0],
        "redirect_uri": REDIRECT_URI,
        "scope": SCOPE,
        "state": "state-1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }


def consent(base_url: str, challenge: str, decision: str) -> dict[str, str]:
    """Load the consent page and press Allow or Deny like a browser; return the answer."""
    page = requests.get(f"{base_url}/authorize", params=authorize_params(challenge), timeout=5)
    assert page.status_code == 200 and ">Allow</button>" in page.text, page.text
    fields = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page.text)
    form = {name: html.unescape(value) for name, value in fields}
    form |= {"email": EMAIL, "decision": decision}
    answer = requests.post(f"{base_url}/authorize", data=form, allow_redirects=False, timeout=5)
    assert answer.status_code == 302
    return dict(parse_qsl(urlsplit(answer.headers["Location"]).query))


def token_request(base_url: str, **form: str) -> requests.Response:
    form = {"client_id": CLIENT[0], "client_secret": CLIENT[1], **form}
    return requests.post(f"{base_url}/token", data=form, timeout=5)


def connect(base_url: str) -> dict[str, Any]:
    """The whole consent flow with the dev client; return the token response."""
    pkce = make_pkce_pair()
    answer = consent(base_url, pkce.challenge, "allow")
    response = token_request(
        base_url,
        grant_type="authorization_code",
        code=answer["code"],
        redirect_uri=REDIRECT_URI,
        code_verifier=pkce.verifier,
    )
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


def refresh(base_url: str, refresh_token: str) -> requests.Response:
    return token_request(base_url, grant_type="refresh_token", refresh_token=refresh_token)


def smtp_auth(port: int, token: str, user: str = EMAIL) -> tuple[int, bytes]:
    """AUTH XOAUTH2 with ``token``; the final reply (235 accepted, 535 refused)."""
    blob = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
        client.ehlo()
        code, reply = client.docmd("AUTH", f"XOAUTH2 {blob}")
        if code == 334:  # the error challenge: answer empty, get the 535
            code, reply = client.docmd("")
        return code, reply


def send(port: int, token: str, subject: str = "Hello") -> bytes:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = EMAIL, "rcpt@example.com", subject
    message.set_content("Body of the message.\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
        client.ehlo()
        blob = f"user={EMAIL}\x01auth=Bearer {token}\x01\x01".encode()
        code, _ = client.docmd("AUTH", "XOAUTH2 " + base64.b64encode(blob).decode())
        assert code == 235
        client.send_message(message)
    return message.as_bytes()


# Both servers, in a thread ----------------------------------------------------------------


def test_both_servers_answer(devserver: Devserver) -> None:
    discovery = requests.get(f"{devserver.base_url}/.well-known/openid-configuration", timeout=5)
    assert discovery.json()["token_endpoint"] == f"{devserver.base_url}/token"
    with smtplib.SMTP("127.0.0.1", devserver.smtp_port, timeout=5) as client:
        code, _ = client.ehlo()
        assert code == 250
        assert client.esmtp_features["auth"].split() == ["OAUTHBEARER", "XOAUTH2"]


def test_banner_says_where_everything_is(devserver: Devserver) -> None:
    out = devserver.stdout.getvalue()
    assert f"OAuth2 server  {devserver.base_url}" in out
    assert f"SMTP server    127.0.0.1:{devserver.smtp_port}" in out
    assert "dev-client / dev-secret" in out
    assert str(devserver.maildir) in out and devserver.maildir.is_dir()
    assert str(devserver.maildir.parent / "oauth-state.json") in out
    assert "expire after 120 s" in out
    assert "an Allow / Deny page" in out
    # The site's dev provider still points at the default ports: say what to set.
    assert f"'BASE_URL': '{devserver.base_url}', 'SMTP_PORT': {devserver.smtp_port}" in out
    # The default 300 s skew would refresh the 120 s tokens before every send: said so.
    assert "set TOKEN_REFRESH_SKEW to about a quarter of the lifetime (30)" in out
    assert out.rstrip().endswith("Quit with CONTROL-C.")


def test_no_hints_when_the_site_points_at_the_server(tmp_path: Path, settings: Any) -> None:
    ports = free_ports(2)
    settings.XOAUTH2_MAIL = {
        "PROVIDERS": {"dev": {"BASE_URL": f"http://127.0.0.1:{ports[0]}", "SMTP_PORT": ports[1]}},
        "TOKEN_REFRESH_SKEW": 30,
    }
    stdout = io.StringIO()
    command = Command(stdout=stdout)
    thread = threading.Thread(
        target=call_command, args=(command, "--maildir", str(tmp_path / "m")), daemon=True
    )
    thread.start()
    try:
        assert command.ready.wait(10)
        assert command.servers is not None
        assert command.servers[0].port == ports[0] and command.servers[1].port == ports[1]
    finally:
        command.stop.set()
        thread.join(10)
    assert "points elsewhere" not in stdout.getvalue()
    assert "TOKEN_REFRESH_SKEW" not in stdout.getvalue()


def test_consent_code_exchange_and_a_delivered_message(devserver: Devserver) -> None:
    tokens = connect(devserver.base_url)
    assert tokens["expires_in"] == 120 and tokens["refresh_token"]
    raw = send(devserver.smtp_port, tokens["access_token"], subject="Größe: ünïcode")

    out = devserver.wait_for_output("Größe")
    line = next(line for line in out.splitlines() if "Größe" in line)
    (eml,) = devserver.maildir.glob("*.eml")
    assert re.fullmatch(
        rf"\[\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\] {EMAIL} -> rcpt@example.com  "
        rf"'Größe: ünïcode'  {eml.stat().st_size} bytes  {re.escape(eml.name)}",
        line,
    ), line
    assert eml.read_bytes().replace(b"\r\n", b"\n") == raw.replace(b"\r\n", b"\n")


def test_userinfo_and_id_token_name_the_account(devserver: Devserver) -> None:
    tokens = connect(devserver.base_url)
    userinfo = requests.get(
        f"{devserver.base_url}/userinfo",
        headers={"Authorization": f"Bearer {tokens['access_token']}"},
        timeout=5,
    )
    assert userinfo.json()["email"] == EMAIL
    claims = tokens["id_token"].split(".")[1]
    assert f'"email": "{EMAIL}"'.encode() in base64.urlsafe_b64decode(claims + "==")


def test_a_wrong_token_is_refused(devserver: Devserver) -> None:
    code, reply = smtp_auth(devserver.smtp_port, "not-a-token-this-server-issued")
    assert code == 535 and b"5.7.8" in reply
    assert not list(devserver.maildir.glob("*.eml"))


def test_a_token_for_another_account_is_refused(devserver: Devserver) -> None:
    tokens = connect(devserver.base_url)
    assert smtp_auth(devserver.smtp_port, tokens["access_token"], "other@example.com")[0] == 535


@pytest.mark.slow
def test_expired_token_is_refused_and_refresh_rotates(tmp_path: Path) -> None:
    with running_devserver(tmp_path, "--token-lifetime", "1") as server:
        assert "expire after 1 s" in server.stdout.getvalue()
        tokens = connect(server.base_url)
        assert smtp_auth(server.smtp_port, tokens["access_token"])[0] == 235
        time.sleep(1.2)
        assert smtp_auth(server.smtp_port, tokens["access_token"])[0] == 535

        renewed = refresh(server.base_url, tokens["refresh_token"])
        assert renewed.status_code == 200
        new = renewed.json()
        assert new["refresh_token"] != tokens["refresh_token"]  # rotated
        assert smtp_auth(server.smtp_port, new["access_token"])[0] == 235
        # The rotated-out refresh token is spent.
        assert refresh(server.base_url, tokens["refresh_token"]).json()["error"] == "invalid_grant"


def test_denied_consent_redirects_with_access_denied(devserver: Devserver) -> None:
    answer = consent(devserver.base_url, make_pkce_pair().challenge, "deny")
    assert answer == {"error": "access_denied", "state": "state-1", "iss": devserver.base_url}


def test_revoked_refresh_token_is_refused_with_its_access_tokens(devserver: Devserver) -> None:
    tokens = connect(devserver.base_url)
    revoked = requests.post(
        f"{devserver.base_url}/revoke", data={"token": tokens["refresh_token"]}, timeout=5
    )
    assert revoked.status_code == 200
    answer = refresh(devserver.base_url, tokens["refresh_token"])
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"
    assert smtp_auth(devserver.smtp_port, tokens["access_token"])[0] == 535


def test_auto_approve_answers_at_once_given_the_account(tmp_path: Path) -> None:
    with running_devserver(tmp_path, "--auto-approve") as server:
        assert "approved at once" in server.stdout.getvalue()
        params = authorize_params(make_pkce_pair().challenge, login_hint=EMAIL)
        answer = requests.get(
            f"{server.base_url}/authorize", params=params, allow_redirects=False, timeout=5
        )
        assert answer.status_code == 302 and "code=" in answer.headers["Location"]
        # Without an account to act as, the consent page is still shown.
        del params["login_hint"]
        page = requests.get(f"{server.base_url}/authorize", params=params, timeout=5)
        assert page.status_code == 200 and ">Deny</button>" in page.text


def test_client_id_and_secret_follow_the_dev_provider_settings(
    tmp_path: Path, settings: Any
) -> None:
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"dev": {"CLIENT_ID": "mine", "CLIENT_SECRET": "s3"}}}
    with running_devserver(tmp_path) as server:
        assert "mine / s3" in server.stdout.getvalue()
        response = requests.post(
            f"{server.base_url}/token",
            data={"grant_type": "client_credentials", "client_id": "mine", "client_secret": "s3"},
            timeout=5,
        )
        assert response.status_code == 200


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--host", "192.0.2.1"], "Refusing to listen on 192.0.2.1"),
        (["--token-lifetime", "0"], "--token-lifetime must be at least 1 second"),
    ],
)
def test_refusals_in_process(tmp_path: Path, options: list[str], message: str) -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match=message):
        call_command("xoauth2_devserver", "--maildir", str(tmp_path), *options)


def test_https_base_url_is_refused(tmp_path: Path, settings: Any) -> None:
    from django.core.management.base import CommandError

    settings.XOAUTH2_MAIL = {"PROVIDERS": {"dev": {"BASE_URL": "https://127.0.0.1:8765"}}}
    with pytest.raises(CommandError, match="set XOAUTH2_MAIL.*http://127.0.0.1:8765"):
        call_command("xoauth2_devserver", "--maildir", str(tmp_path))


def test_allow_non_loopback_warns_loudly() -> None:
    # Checked without binding: a test must not listen where other machines can reach it.
    stderr = io.StringIO()
    command = Command(stderr=stderr)
    from django_xoauth2_mail.providers.dev import DevProvider

    options = {"host": "0.0.0.0", "oauth_port": 0, "smtp_port": 0, "allow_non_loopback": True}
    assert command._addresses(DevProvider({}), options) == ("0.0.0.0", 0, 0)
    assert "WARNING: listening on 0.0.0.0, reachable from other machines" in stderr.getvalue()


# The command as a process ---------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def start_process(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "django", "xoauth2_devserver", *args]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def wait_until_ready(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:  # the banner ends with the quit line
        lines.append(line)
        if line.startswith("Quit with CONTROL-C."):
            return "".join(lines)
    raise AssertionError(f"exited {process.wait()}: {''.join(lines)} {process.communicate()}")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_it_cleanly(tmp_path: Path, signum: int) -> None:
    oauth_port, smtp_port = free_ports(2)
    process = start_process(
        "--oauth-port", str(oauth_port), "--smtp-port", str(smtp_port), "--maildir", str(tmp_path)
    )
    try:
        wait_until_ready(process)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert stdout.strip() == "Stopped." and "Traceback" not in stderr
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", smtp_port), timeout=1):
        pass


@pytest.mark.slow
def test_restart_keeps_issued_tokens(tmp_path: Path) -> None:
    oauth_port, smtp_port = free_ports(2)
    options = ["--oauth-port", str(oauth_port), "--smtp-port", str(smtp_port)]
    options += ["--maildir", str(tmp_path / "mail"), "--state-file", str(tmp_path / "s.json")]
    base_url = f"http://127.0.0.1:{oauth_port}"
    for run in range(2):
        process = start_process(*options)
        try:
            wait_until_ready(process)
            if run == 0:
                tokens = connect(base_url)
            else:
                # A new process: the access token from the first run still opens SMTP,
                # and the refresh token still refreshes.
                assert smtp_auth(smtp_port, tokens["access_token"])[0] == 235
                assert refresh(base_url, tokens["refresh_token"]).status_code == 200
        finally:
            process.terminate()
            process.communicate(timeout=10)
        assert process.returncode == 0
    assert (tmp_path / "s.json").is_file()


@pytest.mark.slow
def test_non_loopback_host_is_refused(tmp_path: Path) -> None:
    process = start_process("--host", "0.0.0.0", "--maildir", str(tmp_path))
    stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 1
    assert "Refusing to listen on 0.0.0.0" in stderr and "--allow-non-loopback" in stderr
    assert stdout == ""


@pytest.mark.slow
def test_a_busy_port_is_reported_with_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process = start_process("--oauth-port", str(port), "--maildir", str(tmp_path))
        stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 1
    assert f"Cannot start the OAuth2 server on 127.0.0.1:{port}: the port is already in use" in (
        stderr
    )
    assert "--oauth-port (0 picks a free one)" in stderr


def test_misspelt_smtp_security_is_one_line(tmp_path: Path, settings: Any) -> None:
    from django.core.management.base import CommandError

    settings.XOAUTH2_MAIL = {"PROVIDERS": {"dev": {"SMTP_SECURITY": "ssl"}}}
    with pytest.raises(CommandError, match="SMTP_SECURITY"):
        call_command("xoauth2_devserver", "--maildir", str(tmp_path))
