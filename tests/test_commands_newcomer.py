"""The management commands on a newcomer's mistakes: each problem named with its fix."""

from __future__ import annotations

import io
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from django.core import mail
from django.core.management import call_command
from django.core.management.base import CommandError

from django_xoauth2_mail.exceptions import TokenRefreshError
from django_xoauth2_mail.management.commands.connect_mailbox import Command as ConnectMailbox
from django_xoauth2_mail.models import Mailbox, MailboxStatus
from django_xoauth2_mail.testing import OAuth2Server
from tests.conftest import SENDER, make_mailbox

pytestmark = pytest.mark.usefixtures("transactional_db")


def command_output(name: str, *args: str) -> tuple[str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    call_command(name, *args, stdout=stdout, stderr=stderr)
    return stdout.getvalue(), stderr.getvalue()


# list_mailboxes ------------------------------------------------------------------------


def test_list_mailboxes_says_what_cannot_send_and_the_fix(
    settings, real_backend, oauth2_settings, oauth2_server
):
    settings.SERVER_EMAIL = "root@localhost"  # Django's default
    settings.DEFAULT_FROM_EMAIL = SENDER
    make_mailbox(oauth2_server, fresh=True)
    Mailbox.objects.create(email="old@example.com", provider="google")
    Mailbox.objects.create(
        email="alerts@example.com", provider="oauth2", status=MailboxStatus.RECONNECT_REQUIRED
    )

    _, stderr = command_output("list_mailboxes")

    assert stderr.splitlines() == [
        "1 mailbox(es) must be reconnected before they can send:",
        "  python manage.py connect_mailbox oauth2 --email alerts@example.com",
        "The provider 'google' of old@example.com is not in XOAUTH2_MAIL['PROVIDERS']: they "
        "cannot send until it is configured.",
        "No mailbox can send from SERVER_EMAIL (root@localhost), so mail_admins(), "
        "mail_managers() and error reports will fail: set SERVER_EMAIL to a connected "
        "mailbox's address, or connect root@localhost.",
    ]


def test_list_mailboxes_accepts_the_fallback_mailbox(
    settings, real_backend, oauth2_settings, oauth2_server
):
    settings.SERVER_EMAIL = "Site <root@localhost>"
    oauth2_settings["DEFAULT_MAILBOX"] = SENDER
    make_mailbox(oauth2_server, fresh=True)
    assert command_output("list_mailboxes")[1] == ""


# connect_mailbox for a provider that is not configured (item 4) ---------------------------


def test_connect_mailbox_for_a_provider_not_configured_shows_the_settings(settings):
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"dev": {}}}
    with pytest.raises(CommandError) as caught:
        call_command("connect_mailbox", "google", "--no-browser")
    message = str(caught.value)
    assert message.startswith(
        "The provider 'google' is not in XOAUTH2_MAIL['PROVIDERS'] (configured: dev). Add it "
        'to your settings, e.g. XOAUTH2_MAIL = {"PROVIDERS": {"google": {"CLIENT_ID": "...", '
        '"CLIENT_SECRET": "..."}}}'
    )
    assert "CLIENT_ID" in message and "has no CLIENT_ID" not in message
    assert not Mailbox.objects.exists()


def test_connect_mailbox_help_lists_the_configured_providers_first(settings):
    settings.XOAUTH2_MAIL = {"PROVIDERS": {"microsoft": {"CLIENT_ID": "x"}, "dev": {}}}
    help_text = " ".join(ConnectMailbox().create_parser("manage.py", "connect_mailbox")
                         .format_help().split())  # fmt: skip
    assert "{microsoft,dev,google,oauth2}" in help_text
    assert (
        "Configured in XOAUTH2_MAIL['PROVIDERS']: microsoft, dev; google, oauth2 must be "
        "added there first." in help_text
    )


# The development server not running (item 6) -----------------------------------------------

DEVSERVER_HINT = "Is `python manage.py xoauth2_devserver` running?"


def closed_port() -> int:
    """A port of 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def devserver_down(settings: Any) -> str:
    base_url = f"http://127.0.0.1:{closed_port()}"
    settings.XOAUTH2_MAIL = {
        "PROVIDERS": {"dev": {"BASE_URL": base_url, "SMTP_PORT": closed_port()}},
        "TOKEN_REFRESH_ATTEMPTS": 1,
        "HTTP_TIMEOUT": 5,
    }
    return base_url


def test_connect_mailbox_dev_checks_the_server_before_printing_a_url(devserver_down):
    stdout = io.StringIO()
    with pytest.raises(CommandError) as caught:
        call_command(
            "connect_mailbox", "dev", "--no-browser", "--timeout", "3",
            stdin=io.StringIO(""), stdout=stdout,
        )  # fmt: skip
    assert str(caught.value) == (
        f"Cannot start the consent: the authorization server {devserver_down} could not be "
        f"reached (ConnectionError). {DEVSERVER_HINT} Nothing was saved; check the network "
        "and AUTHORIZATION_URL of the dev provider, then run the command again."
    )
    assert "http" not in stdout.getvalue()  # no URL that nobody can open


def test_connect_mailbox_dev_device_names_the_devserver(devserver_down):
    with pytest.raises(CommandError) as caught:
        call_command("connect_mailbox", "dev", "--device", "--timeout", "3")
    assert str(caught.value).endswith(f"or connect with --loopback. {DEVSERVER_HINT}")


def test_sending_through_the_dev_provider_names_the_devserver(
    devserver_down, real_backend, oauth2_server
):
    mailbox = make_mailbox(oauth2_server, "demo@example.com")
    Mailbox.objects.filter(pk=mailbox.pk).update(provider="dev")
    with pytest.raises(TokenRefreshError) as caught:
        mail.send_mail("Hi", "Body", "demo@example.com", ["to@example.com"])
    assert str(caught.value).endswith(f"if it persists. {DEVSERVER_HINT}")


def test_send_test_email_names_the_devserver_when_smtp_is_down(devserver_down, oauth2_server):
    mailbox = make_mailbox(oauth2_server, "demo@example.com", fresh=True)
    Mailbox.objects.filter(pk=mailbox.pk).update(provider="dev")
    with pytest.raises(CommandError) as caught:
        call_command("send_test_email", "demo@example.com")
    assert str(caught.value).endswith(DEVSERVER_HINT)


# connect_mailbox microsoft --loopback: an authority that cannot be used (item 7) -----------


@pytest.fixture
def microsoft_authority(settings: Any, tls_certificate: tuple[str, str]) -> Iterator[Any]:
    """The dev OAuth2 server on HTTPS as Microsoft's sign-in service; each test breaks
    the settings its own way, and the real msal reads them."""
    certfile, keyfile = tls_certificate
    with OAuth2Server(certfile=certfile, keyfile=keyfile) as server:
        settings.XOAUTH2_MAIL = {
            "PROVIDERS": {
                "microsoft": {
                    "CLIENT_ID": "public-client",
                    "AUTHORITY_HOST": server.base_url,
                    "HTTP_CA_FILE": certfile,
                }
            },
            "HTTP_TIMEOUT": 5,
        }
        yield server, settings.XOAUTH2_MAIL["PROVIDERS"]["microsoft"]


@pytest.mark.parametrize("flags", [["--loopback"], ["--loopback", "--no-browser"]])
@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("unreachable", r"could not be reached \(ConnectionError\)"),
        ("untrusted", r"The TLS certificate of Microsoft's sign-in service .+ is not trusted"),
        ("wrong tenant", r"cannot be used \(.+\); check the TENANT and AUTHORITY_HOST settings"),
    ],
)
def test_microsoft_loopback_authority_problems_are_one_line(
    microsoft_authority, problem, expected, flags
):
    server, values = microsoft_authority
    if problem == "unreachable":
        values["AUTHORITY_HOST"] = f"https://127.0.0.1:{closed_port()}"
    elif problem == "untrusted":
        del values["HTTP_CA_FILE"]
    else:  # Microsoft answers an unknown tenant's discovery document with a 4xx
        values["AUTHORITY_HOST"] = f"{server.base_url}/no-such-prefix"
    stdout = io.StringIO()
    with pytest.raises(CommandError) as caught:
        call_command(
            "connect_mailbox", "microsoft", *flags, "--timeout", "5",
            stdin=io.StringIO(""), stdout=stdout,
        )  # fmt: skip
    message = str(caught.value)
    assert message.startswith("Microsoft did not start the sign-in (")
    assert re.search(expected, message), message
    assert message.endswith("Nothing was saved; fix that and run the command again.")
    assert "\n" not in message and stdout.getvalue() == ""


# LAST ERROR after the mailbox recovered (item 8) -------------------------------------------


def test_an_error_followed_by_a_success_is_shown_as_past(
    real_backend, oauth2_settings, oauth2_server, xoauth2_smtp_server
):
    mailbox = make_mailbox(oauth2_server)
    oauth2_server.fail_next_token_requests(2, status=503)  # both attempts of one refresh
    with pytest.raises(TokenRefreshError):
        mail.send_mail("Hi", "Body", SENDER, ["to@example.com"])
    row = command_output("list_mailboxes")[0].splitlines()[2]
    assert "Could not refresh the access token" in row and "earlier:" not in row

    assert mail.send_mail("Hi", "Body", SENDER, ["to@example.com"]) == 1  # recovered

    row = command_output("list_mailboxes")[0].splitlines()[2]
    assert "Connected" in row
    assert "earlier: Could not refresh the access token" in row
    mailbox.refresh_from_db()
    assert mailbox.last_error.startswith("Could not refresh")  # kept, with its time
