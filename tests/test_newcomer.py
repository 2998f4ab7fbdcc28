"""A newcomer's first hour: what the docs say, checked against what the code does.

The last test is the whole first hour, scripted: a fresh ``django-admin startproject``, this
repository's wheel installed with its ``[testing]`` extra into a new virtual environment,
the settings that docs/quickstart.rst gives for the development server, ``check``,
``migrate``, ``xoauth2_devserver``, ``connect_mailbox dev --no-browser``, then
``send_test_email``, ``send_mail()``, ``mail_admins()`` and a password reset through
Django's own views, and the pytest examples of docs/testing.rst, every warning an error
(pending deprecations are collected and reported instead). It needs PyPI (pip reuses its
cache) and takes a minute or two: it is ``slow``.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import django
import pytest
import requests

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
    # The usage lines themselves: indented, after the code-block directive.
    lines = [line for line in block.splitlines() if line.startswith("    python manage.py")
             or line.startswith("                    ")]  # fmt: skip
    documented = set(re.findall(r"--[a-z-]+", "\n".join(lines)))
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


# The scripted newcomer run --------------------------------------------------------------

NEWCOMER = "me@example.com"  # the address docs/quickstart.rst connects
ADMIN = "ops@example.org"
READER = "ann@example.org"
# What pip prints when it cannot reach the index at all (not: a package that is missing).
OFFLINE = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution"
    r"|Network is unreachable|Name or service not known|No route to host"
)


# Every warning is an error, except pending deprecations (a removal two Django releases
# away, which the project's CI lets pass too): those are printed, and reported below.
WARNINGS = ("-W", "error", "-W", "always::PendingDeprecationWarning")
PRINTED_WARNING = re.compile(r"^\S+:\d+: (\w*Warning): (.*)$", re.MULTILINE)


class Newcomer:
    """A fresh venv and project in ``home``; runs its commands with warnings as errors."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.venv = home / "venv"
        self.site = home / "mysite"
        self.python = self.venv / "bin" / "python"
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DJANGO_", "PYTHON", "PYTEST", "VIRTUAL_ENV", "XOAUTH2_"))
        } | {"PYTHONUNBUFFERED": "1", "PYTHONUTF8": "1"}
        self.env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        self.pending_deprecations: list[str] = []

    def run(self, *args: str | Path, timeout: float = 120, cwd: Path | None = None) -> str:
        """Run a command; fail with its output unless it exits 0. Returns that output."""
        done = subprocess.run(
            [str(a) for a in args],
            cwd=cwd or self.site,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, (
            f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
        return done.stdout + done.stderr

    def manage(self, *args: str, timeout: float = 120) -> str:
        output = self.run(self.python, *WARNINGS, "manage.py", *args, timeout=timeout)
        self.check_warnings(args[0], output)
        return output

    def check_warnings(self, command: str, output: str) -> None:
        """No warning at all, except pending deprecations, which are collected."""
        for category, message in PRINTED_WARNING.findall(output):
            self.pending_deprecations.append(f"{command}: {category}: {message}")
        assert "Warning" not in PRINTED_WARNING.sub("", output), output

    def popen(self, *args: str, stdin: int | None = subprocess.DEVNULL) -> Process:
        return Process(
            [str(self.python), *WARNINGS, "manage.py", *args], self.site, self.env, stdin
        )


class Process:
    """A running manage.py command whose output lines a thread collects."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], stdin: Any) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.closed = False  # the output ended
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert self.popen.stdout is not None
        threading.Thread(target=self._read, args=(self.popen.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _next(self, timeout: float) -> str | None:
        """One more line, or None when the output ended or nothing came in time."""
        if self.closed:
            return None
        try:
            line = self._queue.get(timeout=max(timeout, 0))
        except queue.Empty:
            return None
        if line is None:
            self.closed = True
        else:
            self.lines.append(line)
        return line

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The first output line matching ``pattern``; fail with the output after timeout."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if match := re.search(pattern, line):
                    return match
            seen = len(self.lines)
            if self._next(deadline - time.monotonic()) is None:
                raise AssertionError(f"{pattern!r} not printed by {self.args[3:]}:\n{self.output}")

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def finish(self, timeout: float = 60) -> str:
        """Wait for the exit; the whole output. Fails unless it exited 0."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{self.args[3:]} still running:\n{self.output}") from None
        deadline = time.monotonic() + 10
        while not self.closed and time.monotonic() < deadline:
            self._next(deadline - time.monotonic())
        assert self.popen.returncode == 0, (
            f"{self.args[3:]} exited {self.popen.returncode}:\n{self.output}"
        )
        return self.output

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        if self.popen.stdin:
            self.popen.stdin.close()


def install(me: Newcomer) -> None:
    """This checkout's wheel with its [testing] extra, this Django, pytest, pytest-django."""
    source = me.home / "source"  # a copy, so that building leaves the checkout untouched
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".tox", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "_build",
            ".mypy_cache", ".ruff_cache", ".pytest_cache", "var", "node_modules",
        ),
    )  # fmt: skip
    me.run(sys.executable, "-m", "venv", me.venv, cwd=me.home)
    pip: list[str | Path] = [me.python, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    wheels = me.home / "wheels"
    pip_from_pypi(me, *pip, "wheel", "--no-deps", "--wheel-dir", wheels, source)
    (wheel,) = wheels.glob("django_xoauth2_mail-*.whl")
    pip_from_pypi(
        me, *pip, "install", "--only-binary", ":all:", f"{wheel}[testing]",
        f"Django=={django.__version__}", "pytest", "pytest-django",
    )  # fmt: skip


def pip_from_pypi(me: Newcomer, *args: str | Path) -> None:
    """Run pip; skip the test (saying why) only when PyPI cannot be reached at all."""
    done = subprocess.run(
        [str(a) for a in args],
        cwd=me.home,
        env=me.env,
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    output = done.stdout + done.stderr
    if done.returncode != 0 and OFFLINE.search(output):
        pytest.skip(
            "PyPI cannot be reached from here, so a fresh install is impossible "
            f"({output.strip().splitlines()[-1]})"
        )
    assert done.returncode == 0, f"pip failed:\n{output}"


def commands(text: str, after: str) -> list[list[str]]:
    """The ``python manage.py ...`` lines of a literal block, as argument lists."""
    lines = literal_block(text, after).splitlines()
    assert all(line.startswith("python manage.py ") for line in lines), lines
    return [line.split()[2:] for line in lines]


def test_commands_the_quickstart_gives() -> None:
    """What the newcomer run below takes from docs/quickstart.rst, and where."""
    text = section((DOCS / "quickstart.rst").read_text(), "Without a Google or Microsoft account")
    assert literal_block(text, "file pattern)::") == "pip install 'django-xoauth2-mail[testing]'"
    assert commands(text, "where it keeps running::") == [
        ["migrate"],
        ["check"],
        ["xoauth2_devserver"],
    ]
    assert commands(text, "send a test message::") == [
        ["connect_mailbox", "dev", "--email", NEWCOMER],
        ["send_test_email", NEWCOMER],
    ]
    blocks = code_blocks(text)
    assert f'DEFAULT_FROM_EMAIL = "{NEWCOMER}"' in blocks["settings.py, every Django version"]
    assert f'SERVER_EMAIL = "{NEWCOMER}"' in blocks["settings.py, every Django version"]
    assert set(code_blocks(text)) == {
        "settings.py, every Django version",
        "settings.py, Django 5.2 and 6.0",
        "settings.py, Django 6.1",
    }


def the_docs_settings() -> str:
    text = section((DOCS / "quickstart.rst").read_text(), "Without a Google or Microsoft account")
    blocks = code_blocks(text)
    backend = "Django 6.1" if django.VERSION >= (6, 1) else "Django 5.2 and 6.0"
    return blocks["settings.py, every Django version"] + blocks[f"settings.py, {backend}"]


# The newcomer's own choices, which the docs leave to Django's documentation: someone to
# receive mail_admins(), and the auth views for the password reset.
ADMINS = f'ADMINS = ["{ADMIN}"]' if django.VERSION >= (6, 0) else f'ADMINS = [("Ops", "{ADMIN}")]'
URLS = """
from django.urls import include

urlpatterns += [path("accounts/", include("django.contrib.auth.urls"))]
"""
# send_mail(), mail_admins() and a password reset through Django's views, in the project.
SCRIPT = f"""
from django.contrib.auth.models import User
from django.core.mail import mail_admins, send_mail
from django.test import Client

assert send_mail("Hello from a newcomer", "It works.", None, ["reader@example.org"]) == 1
mail_admins("Something to know", "From SERVER_EMAIL to ADMINS.")
User.objects.create_user("ann", "{READER}", "old-password")
page = Client(HTTP_HOST="localhost").post("/accounts/password_reset/", {{"email": "{READER}"}})
assert (page.status_code, page["Location"]) == (302, "/accounts/password_reset/done/"), page
print("all sent")
"""


@pytest.mark.slow
def test_a_newcomer_following_the_docs(tmp_path: Path) -> None:
    me = Newcomer(tmp_path)
    install(me)
    quickstart = section(
        (DOCS / "quickstart.rst").read_text(), "Without a Google or Microsoft account"
    )
    me.run(me.venv / "bin" / "django-admin", "startproject", "mysite", cwd=me.home)
    settings_py = me.site / "mysite" / "settings.py"
    with settings_py.open("a") as settings:
        settings.write(f"\n# From docs/quickstart.rst\n{the_docs_settings()}\n{ADMINS}\n")
    with (me.site / "mysite" / "urls.py").open("a") as urls:
        urls.write(URLS)

    migrate, check, devserver = commands(quickstart, "where it keeps running::")
    assert "No migrations to apply" not in me.manage(*migrate)
    assert me.manage(*check).strip() == "System check identified no issues (0 silenced)."

    # Free ports rather than 8765/2525; --auto-approve stands in for pressing Allow.
    server = me.popen(*devserver, "--oauth-port", "0", "--smtp-port", "0", "--auto-approve")
    try:
        base_url = server.wait_for(r"OAuth2 server +(http://127\.0\.0\.1:\d+)").group(1)
        smtp_port = server.wait_for(r"SMTP server +127\.0\.0\.1:(\d+)").group(1)
        server.wait_for(r"^Quit with CONTROL-C\.")
        with settings_py.open("a") as settings:  # as docs/providers/dev.rst says for ports
            settings.write(
                f'XOAUTH2_MAIL["PROVIDERS"]["dev"].update(BASE_URL="{base_url}", '
                f"SMTP_PORT={smtp_port})\n"
            )

        connect_args, send_test = commands(quickstart, "send a test message::")
        # --no-browser, as on a machine without one: the test opens the printed address.
        command = me.popen(*connect_args, "--no-browser", "--timeout", "60", stdin=subprocess.PIPE)
        try:
            url = command.wait_for(r"^(http://\S+)$").group(1)
            assert url.startswith(f"{base_url}/authorize?"), url
            # The dev server approves at once and redirects to the command's local server.
            page = requests.get(url, timeout=30)
            assert "You can close this tab" in page.text, page.text
            output = command.finish()
        finally:
            command.stop()
        assert f"Connected: {NEWCOMER} with Development server (dev)." in output, output
        me.check_warnings("connect_mailbox", output)
        assert "(in 2 min)" in output and "SMTP login to" in output, output

        assert "Sent a test message" in me.manage(*send_test)
        assert "all sent" in me.manage("shell", "-c", SCRIPT)

        summaries = [
            f"{NEWCOMER} -> {NEWCOMER}  ",  # send_test_email
            f"{NEWCOMER} -> reader@example.org  'Hello from a newcomer'",
            f"{NEWCOMER} -> {ADMIN}  '[Django] Something to know'",
            f"{NEWCOMER} -> {READER}  'Password reset on localhost'",
        ]
        for summary in summaries:
            server.wait_for(re.escape(summary), timeout=30)
    finally:
        server.stop()
    emls = list((me.site / "var" / "xoauth2-devserver" / "mail").glob("*.eml"))
    assert len(emls) == 4, server.output
    reset = [eml.read_text() for eml in emls if f"To: {READER}" in eml.read_text()]
    assert len(reset) == 1 and "/accounts/reset/" in reset[0], server.output
    assert "Traceback" not in server.output, server.output
    me.check_warnings("xoauth2_devserver", server.output)

    # docs/testing.rst's examples, in the same project, as its reader would run them.
    testing = (DOCS / "testing.rst").read_text()
    install_line = literal_block(testing, "need pytest and pytest-django::")
    assert install_line == "pip install 'django-xoauth2-mail[testing]' pytest pytest-django"
    blocks = code_blocks(testing)
    (me.site / "pyproject.toml").write_text(blocks["pyproject.toml"])
    (me.site / "conftest.py").write_text(blocks["conftest.py"])
    (me.site / "test_mail.py").write_text(
        blocks["test_mail.py"] + "\n\n" + blocks["test_mail.py (continued)"]
    )
    output = me.run(me.venv / "bin" / "pytest", "-p", "no:cacheprovider", "-W", "error")
    assert re.search(r"\b2 passed\b", output) and "failed" not in output, output

    # Pending deprecations (Django 6.1's RemovedInDjango2028Warning, say) are collected
    # rather than raised, so every step runs; none may remain.
    assert not me.pending_deprecations, me.pending_deprecations
