"""A newcomer's first hour: what the docs say, checked against what the code does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from django_xoauth2_mail.management.commands.connect_mailbox import Command as ConnectMailbox
from tests.test_commands import connect
from tests.test_devserver_command import running_devserver

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


# The docs' code blocks ----------------------------------------------------------------


def section(rst: str, title: str) -> str:
    """The text of the section titled ``title`` (up to the next title of its level)."""
    match = re.search(rf"^{re.escape(title)}\n([-=~])\1+\n", rst, re.MULTILINE)
    assert match, f"no section {title!r}"
    underline = re.escape(match.group(1))
    rest = rst[match.end() :]
    end = re.search(rf"^\S.*\n{underline}{underline}+\n", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def code_blocks(rst: str) -> dict[str, str]:
    """Each ``.. code-block::`` with a ``:caption:``, by caption, dedented."""
    blocks: dict[str, str] = {}
    pattern = r"^\.\. code-block:: \w+\n    :caption: (.+)\n\n((?:    .*\n|\n)+)"
    for caption, body in re.findall(pattern, rst, re.MULTILINE):
        blocks[caption] = "\n".join(line[4:] for line in body.splitlines()).strip() + "\n"
    return blocks


def literal_block(text: str, after: str) -> str:
    """The indented block after the paragraph that ends with ``after`` (``::``)."""
    start = text.index(after) + len(after)
    match = re.match(r"\n\n((?:    .*\n|\n)+)", text[start:])
    assert match, f"no literal block after {after!r}"
    return "\n".join(line[4:] for line in match.group(1).splitlines()).strip()


# Item 14: plain pytest ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("where", [".", "tests"])
def test_plain_pytest_works_from_the_checkout(where: str) -> None:
    """Not only ``python -m pytest``, which puts the current directory on sys.path."""
    pytest_script = Path(sys.executable).with_name("pytest")
    if not pytest_script.exists():
        pytest.skip(f"no pytest script beside {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    run = subprocess.run(
        [str(pytest_script), "--collect-only", "-q", str(ROOT / "tests" / "test_crypto.py")],
        cwd=ROOT / where,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tests collected" in run.stdout


# Item 13: docs/cli.rst ------------------------------------------------------------------

# Options every Django command has; the usage block in the docs leaves them out.
DJANGO_OPTIONS = {
    "-h", "--help", "--version", "-v", "--verbosity", "--settings", "--pythonpath",
    "--traceback", "--no-color", "--force-color", "--skip-checks",
}  # fmt: skip


def test_the_usage_block_names_every_option_of_connect_mailbox() -> None:
    usage = section((DOCS / "cli.rst").read_text(), "connect_mailbox")
    block = usage[: usage.index(".. list-table:: Options")]
    documented = set(re.findall(r"--[a-z-]+", block))
    parser = ConnectMailbox().create_parser("manage.py", "connect_mailbox")
    options = {o for action in parser._actions for o in action.option_strings}
    assert documented == {o for o in options if o.startswith("--")} - DJANGO_OPTIONS


@pytest.mark.django_db(transaction=True)
def test_dev_device_flow_needs_no_device_authorization_url(
    tmp_path: Path, settings: Any, real_backend: None
) -> None:
    """docs/cli.rst: ``connect_mailbox dev --device`` with the dev server's defaults only;
    and its tokens last 2 minutes."""
    with running_devserver(tmp_path) as server:
        assert server.command.servers is not None
        oauth = server.command.servers[0]
        oauth.device_code_interval = 1  # the server asks clients to wait 5 s by default
        settings.XOAUTH2_MAIL = {
            "PROVIDERS": {"dev": {"BASE_URL": server.base_url, "SMTP_PORT": server.smtp_port}}
        }
        run = connect("dev", "--device", "--email", "dev@example.com")
        assert run.first_url() == f"{server.base_url}/device"
        user_code = run.wait_for(r"enter the code (\S+),").group(1)
        assert oauth.approve_device_code(user_code, "dev@example.com")
        output = run.finish()
    assert "Connected: dev@example.com with Development server (dev)." in output
    assert re.search(r"Access token expires .+ \(in 2 min\)", output), output
