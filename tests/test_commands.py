"""The management commands, end to end over real local HTTP and SMTP: no mocks.

``connect_mailbox`` runs in a thread through ``call_command`` while the test plays the
browser with ``requests`` (consent page of the dev OAuth2 server, Allow or Deny, the
redirect to the command's loopback port) or pastes on the command's stdin (a pipe). A
few tests run ``python -m django`` in a subprocess, for the exit status, a real Ctrl-C
and ``webbrowser``.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import django
import pytest
import requests
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections
from django.utils import timezone

from django_xoauth2_mail.models import Mailbox, MailboxStatus
from django_xoauth2_mail.testing import OAuth2Server, XOAuth2SMTPServer
from django_xoauth2_mail.testing.fixtures import TEST_CLIENT_ID, TEST_CLIENT_SECRET
from tests.conftest import SENDER, make_mailbox

ROOT = Path(__file__).resolve().parent.parent
MAIL_SCOPE = "https://mail.google.com/"
OTHER = "other@example.com"

pytestmark = pytest.mark.usefixtures("transactional_db")  # the command runs in a thread


# Running a command in a thread --------------------------------------------------------


class Run:
    """``call_command`` in a thread; its output so far, and how it ended."""

    def __init__(self, name: str, *args: str, stdin: Any = None) -> None:
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.error: BaseException | None = None
        options = {"stdin": stdin} if stdin is not None else {}
        self.thread = threading.Thread(
            target=self._run, args=(name, args, options), name=f"command-{name}", daemon=True
        )
        self.thread.start()

    def _run(self, name: str, args: tuple[str, ...], options: dict[str, Any]) -> None:
        try:
            call_command(name, *args, stdout=self.stdout, stderr=self.stderr, **options)
        except BaseException as exc:
            self.error = exc
        finally:
            connections.close_all()

    @property
    def output(self) -> str:
        return self.stdout.getvalue() + self.stderr.getvalue()

    def wait_for(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.stdout.getvalue(), re.MULTILINE)
            if match:
                return match
            if not self.thread.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} did not appear; output:\n{self.output}\n{self.error}")

    def first_url(self) -> str:
        """What a script does: the first line that is an http(s) URL."""
        return self.wait_for(r"^https?://\S+$").group(0)

    def finish(self, timeout: float = 30) -> str:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the command is still running:\n{self.output}"
        if self.error is not None:
            raise self.error
        return self.output

    def failure(self, timeout: float = 30) -> CommandError:
        with pytest.raises(CommandError) as caught:
            self.finish(timeout)
        return caught.value


def connect(*args: str, stdin: Any = None) -> Run:
    return Run("connect_mailbox", *args, "--timeout", "30", stdin=stdin)


# The browser and the person -----------------------------------------------------------


def consent_form(
    url: str, email: str, decision: str, verify: str | bool = True
) -> tuple[str, dict[str, str]]:
    page = requests.get(url, verify=verify, timeout=5)
    assert page.status_code == 200, page.text
    form = {name: html.unescape(value) for name, value in re.findall(
        r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page.text
    )}  # fmt: skip
    form.update(email=email, decision=decision)
    return urlsplit(url)._replace(query="").geturl(), form


def browse(url: str, email: str = SENDER, decision: str = "allow") -> requests.Response:
    """Open the consent URL, click Allow or Deny, follow the redirect to the loopback."""
    action, form = consent_form(url, email, decision)
    return requests.post(action, data=form, timeout=10)


def redirect_address(url: str, email: str = SENDER, decision: str = "allow") -> str:
    """The address the browser is sent to, without following it (a browser elsewhere)."""
    action, form = consent_form(url, email, decision)
    answer = requests.post(action, data=form, allow_redirects=False, timeout=5)
    assert answer.status_code == 302, answer.text
    return answer.headers["Location"]


def loopback_port(url: str) -> int:
    redirect_uri = dict(parse_qsl(urlsplit(url).query))["redirect_uri"]
    port = urlsplit(redirect_uri).port
    assert port is not None
    return port


def assert_closed(port: int) -> None:
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def assert_no_tokens(output: str, *secrets: str) -> None:
    """Neither a stored token nor any other given secret shows in the output."""
    stored = Mailbox.objects.values_list("access_token", "refresh_token")
    for secret in [*secrets, *(token for pair in stored for token in pair if token)]:
        assert secret not in output


class Pipe:
    """A terminal's stdin: the command reads lines the test writes later."""

    def __init__(self) -> None:
        read_fd, write_fd = os.pipe()
        self.reader = os.fdopen(read_fd, "r")
        self.writer = os.fdopen(write_fd, "w")

    def paste(self, text: str) -> None:
        self.writer.write(text + "\n")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
        self.reader.close()


@pytest.fixture
def terminal() -> Iterator[Pipe]:
    pipe = Pipe()
    yield pipe
    pipe.close()


class InterruptingStdin:
    """A terminal where the person pressed Ctrl-C while the command read."""

    def readline(self) -> str:
        raise KeyboardInterrupt


# Settings ------------------------------------------------------------------------------


@pytest.fixture
def provider_settings(oauth2_settings: dict[str, Any], oauth2_server: OAuth2Server) -> Any:
    """The oauth2 provider of tests/conftest.py, also telling the account's address
    (openid + userinfo), with revocation and the device endpoint."""
    provider = oauth2_settings["PROVIDERS"]["oauth2"]
    provider.update(
        SCOPES=["openid", "email", MAIL_SCOPE],
        USERINFO_URL=oauth2_server.userinfo_url,
        REVOCATION_URL=oauth2_server.revocation_url,
        DEVICE_AUTHORIZATION_URL=oauth2_server.device_authorization_url,
    )
    return provider


# connect_mailbox: the loopback flow -----------------------------------------------------


def test_loopback_flow_connects_and_checks_the_smtp_login(
    provider_settings, oauth2_server, xoauth2_smtp_server
):
    run = connect("oauth2", "--no-browser", stdin=io.StringIO(""))
    url = run.first_url()
    query = dict(parse_qsl(urlsplit(url).query))
    assert url.startswith(oauth2_server.authorization_url + "?")
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert len(query["state"]) >= 32
    assert query["redirect_uri"] == f"http://127.0.0.1:{loopback_port(url)}/"

    page = browse(url)

    assert page.status_code == 200 and "You can close this tab" in page.text
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    output = run.finish()
    mailbox = Mailbox.objects.get()
    assert (mailbox.email, mailbox.provider, mailbox.status) == (SENDER, "oauth2", "connected")
    assert mailbox.scopes == f"openid email {MAIL_SCOPE}"
    assert f"Connected: {SENDER} with OAuth2 server (oauth2)." in output
    assert f"Scopes granted: openid email {MAIL_SCOPE}" in output
    assert re.search(r"Access token expires \d{4}-\d\d-\d\d \d\d:\d\d UTC \(in 60 min\)", output)
    assert "Refresh token saved (encrypted)." in output
    assert f"SMTP login to 127.0.0.1:{xoauth2_smtp_server.port} OK (XOAUTH2)." in output
    [attempt] = xoauth2_smtp_server.auth_attempts
    assert attempt.accepted and attempt.user == SENDER
    assert_closed(loopback_port(url))
    code = dict(parse_qsl(urlsplit(page.history[0].headers["Location"]).query))["code"]
    assert_no_tokens(output, code)


def test_paste_flow_without_the_loopback(provider_settings, terminal, xoauth2_smtp_server):
    run = connect("oauth2", "--no-browser", stdin=terminal.reader)
    url = run.first_url()
    run.wait_for("paste it here and press Enter")
    address = redirect_address(url)  # the browser, elsewhere, never reaches the loopback

    terminal.paste(address)

    output = run.finish()
    assert Mailbox.objects.get().status == MailboxStatus.CONNECTED
    assert "SMTP login to" in output
    assert_no_tokens(output, dict(parse_qsl(urlsplit(address).query))["code"])


def test_paste_forgives_noise_and_accepts_the_bare_code(provider_settings, terminal):
    run = connect("oauth2", "--no-browser", "--no-verify", stdin=terminal.reader)
    url = run.first_url()
    code = dict(parse_qsl(urlsplit(redirect_address(url)).query))["code"]

    terminal.paste("")
    terminal.paste("no idea what to paste")
    terminal.paste(f"  {code}  ")

    output = run.finish()
    assert "That is not the address the provider sent your browser to" in run.stderr.getvalue()
    assert Mailbox.objects.get().email == SENDER
    assert "SMTP login" not in output  # --no-verify


def test_denied_consent_saves_nothing(provider_settings):
    run = connect("oauth2", "--no-browser", stdin=io.StringIO(""))
    url = run.first_url()

    page = browse(url, decision="deny")

    assert page.status_code == 400 and "access_denied" in page.text
    error = run.failure()
    assert str(error).startswith("Consent was refused at the provider (access_denied).")
    assert "Nothing was saved" in str(error) and error.returncode == 1
    assert not Mailbox.objects.exists()
    assert_closed(loopback_port(url))


@pytest.mark.parametrize("via", ["paste", "browser"])
def test_an_answer_with_another_state_is_refused(provider_settings, terminal, via):
    run = connect("oauth2", "--no-browser", stdin=terminal.reader)
    url = run.first_url()
    address = redirect_address(url)
    forged = re.sub(r"state=[^&]+", "state=not-the-one-we-sent", address)

    if via == "browser":
        # Anyone on this machine can send it: refused, and the command keeps waiting.
        page = requests.get(forged, timeout=5)
        assert page.status_code == 400 and "state mismatch" in page.text
        assert requests.get(address, timeout=5).status_code == 200
        assert "Connected:" in run.finish()
        return
    terminal.paste(forged)  # a person pasting an old address: told at once

    error = run.failure()
    assert "does not belong to this request (state mismatch)" in str(error)
    assert "Nothing was saved." in str(error)
    assert not Mailbox.objects.exists()


def test_timeout_when_the_tab_was_closed(provider_settings):
    run = Run("connect_mailbox", "oauth2", "--no-browser", "--timeout", "0.5",
              stdin=io.StringIO(""))  # fmt: skip
    url = run.first_url()

    error = run.failure()

    assert str(error).startswith("No answer came from the provider within 0.5 s")
    assert "--timeout" in str(error)
    assert not Mailbox.objects.exists()
    assert_closed(loopback_port(url))


def test_ctrl_c_while_reading_the_paste(provider_settings):
    run = connect("oauth2", "--no-browser", stdin=InterruptingStdin())

    error = run.failure()

    assert error.returncode == 130
    assert str(error).startswith("Interrupted (Ctrl-C) before the consent finished")
    assert "nothing was saved" in str(error)
    assert not Mailbox.objects.exists()
    assert_closed(loopback_port(run.first_url()))


def test_email_mismatch_is_refused(provider_settings):
    run = connect("oauth2", "--no-browser", "--email", OTHER, stdin=io.StringIO(""))
    url = run.first_url()
    assert dict(parse_qsl(urlsplit(url).query))["login_hint"] == OTHER
    assert f"sign in as {OTHER}" in run.output

    browse(url, email=SENDER)  # the person signed in with another account

    error = run.failure()
    assert f"You asked to connect {OTHER}, but the provider's consent was given by {SENDER}" in (
        str(error)
    )
    assert str(error).endswith("Nothing was saved.")
    assert not Mailbox.objects.exists()


def test_the_address_must_come_from_somewhere(oauth2_settings):
    # tests/conftest.py's oauth2 provider asks for no openid scope and has no userinfo.
    run = connect("oauth2", "--no-browser", "--no-verify", stdin=io.StringIO(""))
    browse(run.first_url())
    assert "did not say which account consented; give it with --email" in str(run.failure())

    run = connect("oauth2", "--no-browser", "--email", SENDER, stdin=io.StringIO(""))
    browse(run.first_url())
    assert "SMTP login to" in run.finish()
    assert Mailbox.objects.get().email == SENDER


def test_reconnect_updates_the_mailbox_in_place(provider_settings, oauth2_server):
    old = make_mailbox(oauth2_server)
    Mailbox.objects.filter(pk=old.pk).update(
        status=MailboxStatus.RECONNECT_REQUIRED, last_error="invalid_grant: revoked"
    )
    run = connect("oauth2", "--no-browser", "--email", SENDER.upper(), stdin=io.StringIO(""))

    browse(run.first_url())

    output = run.finish()
    assert f"Reconnected (it was reconnect required; it can send again): {SENDER}" in output
    mailbox = Mailbox.objects.get()
    assert mailbox.pk == old.pk and mailbox.status == MailboxStatus.CONNECTED
    assert mailbox.last_error == "" and mailbox.refresh_token != old.refresh_token


def test_failed_smtp_login_check(provider_settings, xoauth2_smtp_server):
    xoauth2_smtp_server.validate_token = lambda user, token: False
    run = connect("oauth2", "--no-browser", stdin=io.StringIO(""))

    browse(run.first_url())

    error = run.failure()
    message = str(error)
    assert message.startswith(f"{SENDER} is saved, but the SMTP login check failed: ")
    assert "refused XOAUTH2 authentication" in message
    assert f"send_test_email {SENDER}" in message and error.returncode == 1
    mailbox = Mailbox.objects.get()
    assert mailbox.status == MailboxStatus.CONNECTED  # the consent itself worked
    assert "refused XOAUTH2 authentication" in mailbox.last_error
    assert len(xoauth2_smtp_server.auth_attempts) == 2  # once more after a refresh
    assert_no_tokens(run.output + message)


def test_no_graphical_session_means_paste(provider_settings, terminal, monkeypatch):
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"):
        monkeypatch.delenv(name, raising=False)
    if sys.platform in ("darwin", "win32"):
        pytest.skip("a desktop system: the browser would really open")
    run = connect("oauth2", "--no-verify", stdin=terminal.reader)  # no --no-browser
    url = run.first_url()
    run.wait_for("No web browser could be opened here: open the address on any machine.")
    run.wait_for("paste it here and press Enter")
    terminal.paste(redirect_address(url))
    assert f"Connected: {SENDER}" in run.finish()


def test_port_option_and_a_port_in_use(provider_settings):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = connect("oauth2", "--no-browser", "--port", str(port), stdin=io.StringIO(""))
        error = run.failure()
    assert str(error).startswith(f"Cannot listen on 127.0.0.1:{port} for the provider's answer")
    assert "--port 0" in str(error)

    run = connect("oauth2", "--no-browser", "--port", str(port), stdin=io.StringIO(""))
    assert loopback_port(run.first_url()) == port
    browse(run.first_url())
    run.finish()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "--port must be 0 to 65535"),
        (["--timeout", "0"], "--timeout must be a positive number of seconds"),
        (["--device", "--loopback"], "not allowed with argument"),
    ],
)
def test_bad_options(provider_settings, args, message):
    with pytest.raises(CommandError, match=message):
        call_command("connect_mailbox", "oauth2", *args)


def test_provider_without_an_authorization_url(settings):
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"oauth2": {"CLIENT_ID": "x", "TOKEN_URL": "x"}}}
    with pytest.raises(CommandError, match=r"Set AUTHORIZATION_URL in XOAUTH2_MAIL\['PROVIDERS'\]"):
        call_command("connect_mailbox", "oauth2", "--no-browser", stdin=io.StringIO(""))


def test_google_offers_no_device_flow(settings):
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"google": {"CLIENT_ID": "x", "CLIENT_SECRET": "y"}}}
    with pytest.raises(CommandError, match="Google offers no device-code flow for sending mail"):
        call_command("connect_mailbox", "google", "--device")


# connect_mailbox: the device flow -------------------------------------------------------


@pytest.fixture
def microsoft_servers(settings: Any, tls_certificate: tuple[str, str]) -> Iterator[Any]:
    """The dev OAuth2 server on HTTPS as Microsoft's sign-in service (msal speaks nothing
    else), with a public client, and an SMTP server that takes its tokens."""
    certfile, keyfile = tls_certificate
    with (
        OAuth2Server(certfile=certfile, keyfile=keyfile) as server,
        XOAuth2SMTPServer(server.validate_access_token) as smtp,
    ):
        server.add_client("public-client", None)
        server.device_code_interval = 1
        settings.XOAUTH2_MAIL = {
            "PROVIDERS": {
                "microsoft": {
                    "CLIENT_ID": "public-client",
                    "AUTHORITY_HOST": server.base_url,
                    "HTTP_CA_FILE": certfile,
                    "SMTP_HOST": "127.0.0.1",
                    "SMTP_PORT": smtp.port,
                    "SMTP_SECURITY": "none",
                }
            },
            "SMTP_TIMEOUT": 5,
            "HTTP_TIMEOUT": 5,
        }
        yield server, smtp


@pytest.mark.slow
def test_microsoft_uses_the_device_flow_by_default(microsoft_servers):
    server, smtp = microsoft_servers
    run = connect("microsoft")
    url = run.first_url()
    assert url == server.device_verification_url
    user_code = run.wait_for(r"enter the code ([A-Z]{4}-[A-Z]{4})").group(1)

    assert server.approve_device_code(user_code, SENDER)

    output = run.finish()
    mailbox = Mailbox.objects.get()
    assert (mailbox.email, mailbox.provider) == (SENDER, "microsoft")
    assert f"Connected: {SENDER} with Microsoft (microsoft)." in output
    assert f"SMTP login to 127.0.0.1:{smtp.port} OK (XOAUTH2)." in output
    assert [r["grant_type"] for r in server.token_requests][-1].endswith("device_code")
    assert_no_tokens(output)


@pytest.mark.slow
def test_device_sign_in_refused(microsoft_servers):
    server, _ = microsoft_servers
    run = connect("microsoft", "--device")
    user_code = run.wait_for(r"enter the code (\S+),").group(1)
    server.deny_device_code(user_code)
    message = str(run.failure())
    assert message.startswith(f"The sign-in with code {user_code} was refused (access_denied).")
    assert "Nothing was saved." in message
    assert not Mailbox.objects.exists()


@pytest.mark.slow
def test_device_sign_in_times_out(microsoft_servers):
    run = Run("connect_mailbox", "microsoft", "--timeout", "1.5")
    error = run.failure()
    assert str(error).startswith("The device sign-in did not finish (nobody entered the code")
    assert str(error).endswith("Nothing was saved; run the command again with a longer --timeout.")
    assert not Mailbox.objects.exists()


def test_microsoft_loopback_on_request(microsoft_servers, tls_certificate):
    server, _ = microsoft_servers
    run = connect("microsoft", "--loopback", "--no-browser", stdin=io.StringIO(""))
    url = run.first_url()
    assert url.startswith(f"{server.base_url}/common/oauth2/v2.0/authorize?")
    assert "--port applies" not in run.output
    with pytest.raises(CommandError, match="--port applies to the browser redirect"):
        call_command("connect_mailbox", "microsoft", "--port", "8080")
    action, form = consent_form(url, SENDER, "allow", verify=tls_certificate[0])
    page = requests.post(action, data=form, verify=tls_certificate[0], timeout=10)
    assert "You can close this tab" in page.text
    assert "SMTP login to" in run.finish()


@pytest.mark.slow
def test_oauth2_device_flow(provider_settings, oauth2_server):
    oauth2_server.device_code_interval = 1
    run = connect("oauth2", "--device")
    assert run.first_url() == oauth2_server.device_verification_url
    user_code = run.wait_for(r"enter the code ([A-Z]{4}-[A-Z]{4})").group(1)
    assert f"?user_code={user_code}" in run.wait_for(r"\(Or open (\S+), which").group(1)
    oauth2_server.approve_device_code(user_code, SENDER)
    output = run.finish()
    assert f"Connected: {SENDER} with OAuth2 server (oauth2)." in output
    assert "SMTP login to" in output


# list_mailboxes, send_test_email, disconnect_mailbox -------------------------------------


def command_output(name: str, *args: str) -> tuple[str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    call_command(name, *args, stdout=stdout, stderr=stderr)
    return stdout.getvalue(), stderr.getvalue()


def test_list_mailboxes(oauth2_settings, oauth2_server):
    assert command_output("list_mailboxes")[0].startswith("No mailboxes yet. Connect one with")
    fresh = make_mailbox(oauth2_server, fresh=True)
    Mailbox.objects.filter(pk=fresh.pk).update(
        last_sent_at=dt.datetime(2030, 1, 2, 3, 4, tzinfo=dt.UTC)
    )
    Mailbox.objects.create(
        email="broken@example.com", provider="google", status=MailboxStatus.RECONNECT_REQUIRED,
        last_error="invalid_grant: Token has been expired or revoked.\nSecond line " + "x" * 80,
        last_error_at=timezone.now(),
        access_token_expires_at=timezone.now() - dt.timedelta(hours=2),
    )  # fmt: skip

    stdout, stderr = command_output("list_mailboxes")

    header, rule, broken, sender = stdout.splitlines()
    assert header.split() == ["ADDRESS", "PROVIDER", "STATUS", "ACCESS", "TOKEN", "LAST",
                              "SEND", "LAST", "ERROR"]  # fmt: skip
    assert set(rule.replace(" ", "")) == {"-"}
    assert broken.startswith("broken@example.com  google")
    assert "Reconnect required" in broken and "expired 2 h ago" in broken
    # One line, cut at 60 characters, with when it happened.
    assert "invalid_grant: Token has been expired or revoked. Second ... (20" in broken
    assert sender.startswith(f"{SENDER}  oauth2") and "Connected" in sender
    assert "in 60 min" in sender and "2030-01-02 03:04 UTC" in sender
    assert sender.rstrip().endswith("-")  # no error
    assert header.index("STATUS") == broken.index("Reconnect") == sender.index("Connected")
    assert "1 mailbox(es) must be reconnected" in stderr
    assert_no_tokens(stdout + stderr)


def test_send_test_email(oauth2_settings, oauth2_server, xoauth2_smtp_server, settings):
    # Django's test setup swapped in locmem; the command does not use it.
    if django.VERSION >= (6, 1):
        assert "locmem" in settings.MAILERS["default"]["BACKEND"]
    else:
        assert "locmem" in settings.EMAIL_BACKEND
    make_mailbox(oauth2_server)

    stdout, _ = command_output("send_test_email", SENDER.upper())
    stdout_two, _ = command_output("send_test_email", SENDER, "--to", "a@example.org",
                                   "--to", "b@example.org", "--subject", "Ping")  # fmt: skip

    port = xoauth2_smtp_server.port
    assert stdout == (
        f"Sent a test message from {SENDER} to {SENDER} through 127.0.0.1:{port} (SMTP, XOAUTH2).\n"
    )
    assert f"to a@example.org, b@example.org through 127.0.0.1:{port}" in stdout_two
    first, second = xoauth2_smtp_server.wait_for_messages(2)
    assert (first.mail_from, first.rcpt_tos) == (SENDER, [SENDER])
    assert second.rcpt_tos == ["a@example.org", "b@example.org"]
    assert b"Subject: Ping" in second.data and b"If you can read it" in second.data
    assert Mailbox.objects.get().last_sent_at is not None
    assert_no_tokens(stdout + stdout_two)


def test_send_test_email_failures(oauth2_settings, oauth2_server):
    with pytest.raises(CommandError, match=f"No mailbox has the address {OTHER}.+list_mailboxes"):
        call_command("send_test_email", OTHER)
    mailbox = make_mailbox(oauth2_server)
    Mailbox.objects.filter(pk=mailbox.pk).update(status=MailboxStatus.RECONNECT_REQUIRED)
    with pytest.raises(CommandError, match="The test message was not sent: The mailbox .+ must "
                       "be reconnected.+connect_mailbox"):  # fmt: skip
        call_command("send_test_email", SENDER)


def test_disconnect_revokes_and_wipes(provider_settings, oauth2_server):
    mailbox = make_mailbox(oauth2_server, fresh=True)
    refresh_token = str(mailbox.refresh_token)

    stdout, stderr = command_output("disconnect_mailbox", SENDER)

    assert stdout.splitlines() == [
        f"Revoked the consent of {SENDER} at OAuth2 server.",
        f"Wiped the stored tokens of {SENDER}; it is disconnected and cannot send. "
        f"`python manage.py connect_mailbox oauth2 --email {SENDER}` connects it again.",
    ]
    assert stderr == ""
    mailbox.refresh_from_db()
    assert mailbox.status == MailboxStatus.DISCONNECTED
    assert (mailbox.refresh_token, mailbox.access_token, mailbox.access_token_expires_at) == (
        None, None, None,
    )  # fmt: skip
    refused = requests.post(oauth2_server.token_url, timeout=5, data={
        "grant_type": "refresh_token", "refresh_token": refresh_token,
        "client_id": TEST_CLIENT_ID, "client_secret": TEST_CLIENT_SECRET,
    })  # fmt: skip
    assert refused.json()["error"] == "invalid_grant"  # revoked at the provider
    assert refresh_token not in stdout
    assert "holds no tokens: nothing to revoke" in command_output("disconnect_mailbox", SENDER)[0]


def test_disconnect_without_revocation_and_delete(oauth2_settings, oauth2_server):
    make_mailbox(oauth2_server)  # tests/conftest.py's oauth2 provider has no REVOCATION_URL

    stdout, stderr = command_output("disconnect_mailbox", SENDER, "--delete")

    assert stderr.startswith(f"OAuth2 server did not revoke the consent of {SENDER}")
    assert "remove its access at the account's security settings" in stderr
    assert stdout == f"Deleted the mailbox {SENDER} and its tokens.\n"
    assert not Mailbox.objects.exists()
    with pytest.raises(CommandError, match="No mailbox has the address"):
        call_command("disconnect_mailbox", SENDER)


# In a subprocess, as a person runs them -------------------------------------------------


@dataclass
class Servers:
    oauth: OAuth2Server
    smtp: XOAuth2SMTPServer


@pytest.fixture
def auto_approving() -> Iterator[Servers]:
    """A dev OAuth2 server that approves at once when the request names the account."""
    with (
        OAuth2Server(auto_approve=True) as server,
        XOAuth2SMTPServer(server.validate_access_token) as smtp,
    ):
        server.add_client(TEST_CLIENT_ID, TEST_CLIENT_SECRET)
        yield Servers(server, smtp)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def manage(tmp_path: Path, servers: Servers, *args: str, **popen: Any) -> subprocess.Popen[str]:
    """``python -m django ARGS`` with the test database and ``servers`` as oauth2."""
    server = servers.oauth
    db = {key: connection.settings_dict[key] for key in ("ENGINE", "NAME", "HOST", "PORT",
                                                          "USER", "PASSWORD")}  # fmt: skip
    xoauth2_mail = {"PROVIDERS": {"oauth2": {
        "CLIENT_ID": TEST_CLIENT_ID, "CLIENT_SECRET": TEST_CLIENT_SECRET,
        "AUTHORIZATION_URL": server.authorization_url, "TOKEN_URL": server.token_url,
        "USERINFO_URL": server.userinfo_url, "SCOPES": ["openid", MAIL_SCOPE],
        "SMTP_HOST": "127.0.0.1", "SMTP_PORT": servers.smtp.port, "SMTP_SECURITY": "none",
    }}}  # fmt: skip
    (tmp_path / "command_settings.py").write_text(textwrap.dedent(f"""\
        from tests.settings import *  # noqa: F403
        DATABASES = {{"default": {db!r}}}
        XOAUTH2_MAIL = {xoauth2_mail!r}
    """))  # fmt: skip
    # PYTHONUNBUFFERED off: the command itself must flush what a script waits for.
    env = dict(
        os.environ, DJANGO_SETTINGS_MODULE="command_settings", PYTHONUNBUFFERED="",
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), **popen.pop("env", {}),
    )  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "django", *args], cwd=tmp_path, env=env, text=True,
        # A CI runner may start the tests with SIGINT ignored (a background job of a
        # non-interactive shell), and children inherit that: give Ctrl-C back to them.
        preexec_fn=_default_sigint,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen,
    )  # fmt: skip


def first_url_line(process: subprocess.Popen[str]) -> str:
    """Read the output as a script would, line by line, as it comes through the pipe."""
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("http"):
            return line.strip()
    raise AssertionError(f"no URL; stderr:\n{process.stderr.read() if process.stderr else ''}")


@pytest.mark.slow
def test_subprocess_opens_the_browser(tmp_path, auto_approving):
    # webbrowser runs $BROWSER with the URL; this one behaves like a browser would.
    browser = tmp_path / "browser"
    browser.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import pathlib, sys, requests
        pathlib.Path({str(tmp_path / "opened")!r}).write_text(sys.argv[1])
        requests.get(sys.argv[1], timeout=10).raise_for_status()
    """))  # fmt: skip
    browser.chmod(0o755)
    process = manage(tmp_path, auto_approving, "connect_mailbox", "oauth2", "--email", SENDER,
                     "--timeout", "30", env={"BROWSER": str(browser)})  # fmt: skip
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr
    url = next(line for line in stdout.splitlines() if line.startswith("http"))
    assert (tmp_path / "opened").read_text() == url
    assert "Opened it in your web browser." in stdout
    assert "paste it here" not in stdout
    assert f"Connected: {SENDER} with OAuth2 server (oauth2)." in stdout
    assert "SMTP login to 127.0.0.1:" in stdout
    assert_no_tokens(stdout + stderr)


@pytest.mark.slow
def test_subprocess_paste_and_exit_status(tmp_path, auto_approving):
    process = manage(tmp_path, auto_approving, "connect_mailbox", "oauth2", "--email", SENDER,
                     "--no-browser", "--timeout", "30", stdin=subprocess.PIPE)  # fmt: skip
    url = first_url_line(process)  # arrives while the command waits: the output is flushed
    redirect = requests.get(url, allow_redirects=False, timeout=5).headers["Location"]
    forged = re.sub(r"state=[^&]+", "state=forged", redirect)
    stdout, stderr = process.communicate(forged + "\n", timeout=60)

    assert process.returncode == 1
    assert "CommandError: The consent answer does not belong to this request" in stderr
    assert not Mailbox.objects.exists()

    process = manage(tmp_path, auto_approving, "connect_mailbox", "oauth2", "--email", SENDER,
                     "--no-browser", "--timeout", "30", stdin=subprocess.PIPE)  # fmt: skip
    answer = requests.get(first_url_line(process), allow_redirects=False, timeout=5)
    stdout, stderr = process.communicate(answer.headers["Location"] + "\n", timeout=60)
    assert process.returncode == 0, stderr
    assert "SMTP login to" in stdout
    assert Mailbox.objects.get().email == SENDER


@pytest.mark.slow
def test_subprocess_ctrl_c(tmp_path, auto_approving):
    process = manage(tmp_path, auto_approving, "connect_mailbox", "oauth2", "--no-browser",
                     "--timeout", "30", stdin=subprocess.PIPE)  # fmt: skip
    port = loopback_port(first_url_line(process))

    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 130
    assert "CommandError: Interrupted (Ctrl-C) before the consent finished" in stderr
    assert "Traceback" not in stderr
    assert_closed(port)
    assert not Mailbox.objects.exists()


# The SASL mechanism in reports (OAUTHBEARER, RFC 7628) ---------------------------------


@pytest.mark.parametrize("smtp_sasl_mechanisms", [("OAUTHBEARER",)])
def test_connect_mailbox_names_the_mechanism_it_logged_in_with(
    smtp_sasl_mechanisms, provider_settings, oauth2_server, xoauth2_smtp_server
):
    oauth2_server.device_code_interval = 1
    run = connect("oauth2", "--device")
    user_code = run.wait_for(r"enter the code ([A-Z]{4}-[A-Z]{4})").group(1)
    assert oauth2_server.approve_device_code(user_code, SENDER)

    output = run.finish()

    assert f"SMTP login to 127.0.0.1:{xoauth2_smtp_server.port} OK (OAUTHBEARER)." in output
    [attempt] = xoauth2_smtp_server.auth_attempts
    assert attempt.accepted and attempt.mechanism == "OAUTHBEARER"
    assert_no_tokens(output)


@pytest.mark.parametrize("smtp_sasl_mechanisms", [("OAUTHBEARER",)])
def test_send_test_email_names_the_mechanism_it_used(
    smtp_sasl_mechanisms, oauth2_settings, oauth2_server, xoauth2_smtp_server
):
    make_mailbox(oauth2_server)

    stdout, _ = command_output("send_test_email", SENDER)

    port = xoauth2_smtp_server.port
    assert stdout == (
        f"Sent a test message from {SENDER} to {SENDER} through 127.0.0.1:{port} "
        "(SMTP, OAUTHBEARER).\n"
    )
    assert [a.mechanism for a in xoauth2_smtp_server.auth_attempts] == ["OAUTHBEARER"]
    assert_no_tokens(stdout)


# connect_mailbox --check: what discovery found (RFC 8414 / OpenID Connect) --------------


def test_check_prints_what_was_discovered(settings, oauth2_server):
    from django_xoauth2_mail.providers import discovery

    discovery.clear_cache()
    oauth2_server.metadata_changes = {"openid-configuration": {"revocation_endpoint": None}}
    settings.XOAUTH2_MAIL = {
        "PROVIDERS": {
            "oauth2": {
                "CLIENT_ID": TEST_CLIENT_ID,
                "ISSUER": oauth2_server.issuer,
                "USERINFO_URL": "https://id.example/me",
                "SMTP_HOST": "127.0.0.1",
            }
        }
    }

    stdout, stderr = command_output("connect_mailbox", "oauth2", "--check")

    base = oauth2_server.base_url
    assert f"Issuer {base}: metadata read and checked." in stdout
    assert f"Read {base}/.well-known/oauth-authorization-server\n" in stdout
    assert f"Read {base}/.well-known/openid-configuration\n" in stdout
    assert f"TOKEN_URL                 {base}/token\n" in stdout
    assert f"REVOCATION_URL            {base}/revoke\n" in stdout  # from RFC 8414's
    assert (
        f"USERINFO_URL              {base}/userinfo  (set explicitly: https://id.example/me "
        "is used)"
    ) in stdout
    assert "PKCE methods              S256" in stdout
    assert "RFC 9207 iss parameter    yes: the iss check is on" in stdout  # the dev server sends it
    assert stderr == ""


def test_check_refuses_a_mismatched_issuer_and_a_provider_without_issuer(settings, oauth2_server):
    from django_xoauth2_mail.providers import discovery

    discovery.clear_cache()
    settings.XOAUTH2_MAIL = {
        "PROVIDERS": {"oauth2": {"CLIENT_ID": "c", "ISSUER": oauth2_server.issuer + "/"}}
    }
    with pytest.raises(CommandError, match="RFC 8414 requires them to be identical"):
        call_command("connect_mailbox", "oauth2", "--check")

    settings.XOAUTH2_MAIL = {"PROVIDERS": {"oauth2": {"CLIENT_ID": "c", "TOKEN_URL": "x"}}}
    with pytest.raises(CommandError, match="has no ISSUER"):
        call_command("connect_mailbox", "oauth2", "--check")


def test_email_trusted_unchecked_is_warned_about(oauth2_settings, oauth2_server):
    # tests/conftest.py's oauth2 provider never says which account consented.
    make_mailbox(oauth2_server, SENDER)
    run = connect("oauth2", "--no-browser", "--no-verify", "--email", SENDER, stdin=io.StringIO(""))
    browse(run.first_url(), email=OTHER)  # signed in as another account

    run.finish()
    warning = run.stderr.getvalue()
    assert "did not say which account gave consent" in warning and "unchecked" in warning
    assert "replaces the grant this mailbox had" in warning
