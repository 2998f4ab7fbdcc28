"""``scripts/demo`` end to end, and the example project's pages.

``test_scripts_demo`` runs the real script in a subprocess: about 35 s once .venv-demo
exists; the first run on a machine also creates that venv (pip, a minute or two). Leave
it out with ``-k "not scripts_demo"`` or ``XOAUTH2_MAIL_SKIP_DEMO=1``.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client

from example_project.management.commands.send_demo_mail import Command as SendDemoMail
from tests.test_dev_provider import DEMO, connect_through_consent, dev_site

__all__ = ["dev_site"]  # a fixture, imported for the tests below

ROOT = Path(__file__).resolve().parent.parent
DEMO_SCRIPT = ROOT / "scripts" / "demo"


@pytest.mark.demo
@pytest.mark.skipif(
    bool(os.environ.get("XOAUTH2_MAIL_SKIP_DEMO")), reason="XOAUTH2_MAIL_SKIP_DEMO is set"
)
@pytest.mark.slow
def test_scripts_demo(tmp_path: Path) -> None:
    var_dir = tmp_path / "var"
    env = dict(os.environ, EXAMPLE_VAR_DIR=str(var_dir), NO_COLOR="1")
    venv_ready = (ROOT / ".venv-demo" / ".installed-from").exists()
    timeout = 180 if venv_ready else 600
    # A session of its own, so a timeout can stop it (it stops its children on SIGTERM).
    process = subprocess.Popen(
        [str(DEMO_SCRIPT)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"scripts/demo did not finish within {timeout} s:\n{output}")

    assert process.returncode == 0, output
    emls = sorted((var_dir / "xoauth2-devserver" / "mail").glob("*.eml"))
    assert len(emls) == 3, output
    assert b"Subject: Hello from the demo (1/3)" in emls[0].read_bytes()
    assert b"Subject: Hello over OAUTHBEARER (3/3)" in emls[2].read_bytes()
    # The first send reused the consent's token; the second, past its lifetime, refreshed it.
    assert "Access token after:  expires at" in output
    assert ": reused, no refresh" in output
    assert ": refreshed (refresh token rotated)" in output
    # 'auto' took XOAUTH2 for the first two; the third was told to use OAUTHBEARER.
    sends = re.findall(r"send_demo_mail \| Sent 1 message over SMTP AUTH (\w+): ", output)
    assert sends == ["XOAUTH2", "XOAUTH2", "OAUTHBEARER"], output
    summaries = re.findall(r"devserver \| \[[-0-9 :]+\] demo@example.com -> ", output)
    assert len(summaries) == 3, output
    assert "devserver | Stopped." in output
    for port in re.findall(r"(?:OAuth2|SMTP) server +(?:http://)?127\.0\.0\.1:(\d+)", output):
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(port)), 1):
            pass  # nothing the demo started is left listening
    assert "access_token" not in output.replace("xoauth2_mail", "")


# The example project's pages, in-process against the dev server ---------------------------


@pytest.fixture
def example_site(settings: Any, dev_site: Any) -> Any:
    settings.ROOT_URLCONF = "example_project.urls"
    settings.TEMPLATES = [
        {**settings.TEMPLATES[0], "DIRS": [ROOT / "example_project" / "templates"]}
    ]
    settings.DEFAULT_FROM_EMAIL = DEMO
    connect_through_consent(DEMO)
    return dev_site


def test_home_page_sends_with_send_mail(example_site: Any, client: Client) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert b"demo@example.com" in page.content and b"Connected" in page.content

    answer = client.post(
        "/", {"to": "reader@example.org", "subject": "From the form", "body": "Hi"}, follow=True
    )
    assert b"Sent 1 message from demo@example.com to reader@example.org." in answer.content
    assert "'From the form'" in example_site.wait_for_output("'From the form'")


def test_home_page_shows_what_to_do_without_a_mailbox(example_site: Any, client: Client) -> None:
    from django_xoauth2_mail.models import Mailbox

    Mailbox.objects.all().delete()
    answer = client.post("/", {"to": "reader@example.org", "subject": "S", "body": "B"})
    assert b"connect_mailbox" in answer.content  # MailboxNotFound's advice, on the page


def test_password_reset_email_goes_through_the_backend(example_site: Any, client: Client) -> None:
    User.objects.create_user("reader", "reader@example.org", "password")
    answer = client.post("/accounts/password_reset/", {"email": "reader@example.org"})
    assert answer.status_code == 302
    output = example_site.wait_for_output("Password reset on")
    assert f"{DEMO} -> reader@example.org  'Password reset on" in output


@pytest.mark.parametrize(
    ("option", "used"), [([], "XOAUTH2"), (["--sasl-mechanism", "OAUTHBEARER"], "OAUTHBEARER")]
)
def test_send_demo_mail_names_the_mechanism_it_logged_in_with(
    example_site: Any, option: list[str], used: str
) -> None:
    out = io.StringIO()
    # The example project is not an installed app here: the command object, not its name.
    call_command(SendDemoMail(), "--subject", f"Over {used}", *option, stdout=out)
    assert f"Sent 1 message over SMTP AUTH {used}: {DEMO} -> someone@example.com" in out.getvalue()
    assert f"'Over {used}'" in example_site.wait_for_output(f"'Over {used}'")
