"""The demo's steps, each one or two ``manage.py`` commands."""

from __future__ import annotations

import email.parser
import email.policy
import os
import re
import time
from pathlib import Path

import requests

from django_xoauth2_mail.providers.dev import DEFAULT_OAUTH_PORT, DEFAULT_SMTP_PORT
from example_project.demo.processes import DemoError, Process, free_port, heading, say

URL = re.compile(r"https?://[^\s\"'<>]+")
STEPS = 7


def step(number: int, text: str) -> None:
    heading(f"[{number}/{STEPS}] {text}")


class Demo:
    def __init__(self, var_dir: Path, mailbox: str, token_lifetime: int) -> None:
        self.var_dir = var_dir
        self.mailbox = mailbox
        self.token_lifetime = token_lifetime
        self.maildir = var_dir / "xoauth2-devserver" / "mail"  # as the command's default
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", EXAMPLE_VAR_DIR=str(var_dir))
        self.env["EXAMPLE_MAILBOX"] = mailbox
        # Not an inherited DJANGO_SETTINGS_MODULE: a shell set up for another project (or a
        # test run) would point manage.py elsewhere.
        self.env["DJANGO_SETTINGS_MODULE"] = os.environ.get(
            "XOAUTH2_MAIL_DEMO_SETTINGS", "example_project.settings"
        )
        self.processes: list[Process] = []
        self.devserver: Process | None = None

    def start(self, label: str, *args: str) -> Process:
        process = Process(label, list(args), self.env)
        self.processes.append(process)
        return process

    def run_quietly(self, label: str, *args: str, timeout: float = 120) -> list[str]:
        """Run a command to its end; its output is shown only if it fails."""
        process = self.start(label, *args)
        if process.finish(timeout) != 0:
            raise DemoError(process.failure(f"failed (exit code {process.popen.returncode})"))
        return process.lines

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    # The steps ---------------------------------------------------------------------------

    def run(self, serve: bool) -> None:
        started = time.monotonic()
        self.prepare()
        self.start_devserver()
        approved_at = self.connect()
        step(4, "Send a message with send_mail(): the access token from the consent is used")
        self.send("Hello from the demo (1/3)", "XOAUTH2")
        step(5, f"Wait until the access token expires ({self.token_lifetime} s), send again")
        wait = approved_at + self.token_lifetime + 1 - time.time()
        if wait > 0:
            say(f"  Waiting {wait:.0f} s ...")
            time.sleep(wait)
        self.send("Hello again, with a refreshed token (2/3)", "XOAUTH2", expect_refresh=True)
        step(6, "Send with OAUTHBEARER (RFC 7628), the standard mechanism, instead of XOAUTH2")
        say("  The dev server offers both; 'auto' (the default) takes XOAUTH2. Here the")
        say("  provider's SASL_MECHANISM is set to OAUTHBEARER for one send_demo_mail run.")
        self.send("Hello over OAUTHBEARER (3/3)", "OAUTHBEARER", sasl_mechanism="OAUTHBEARER")
        if serve:
            self.serve()
            return
        step(7, "Done")
        say(
            f"  Three messages went out over SMTP in {time.monotonic() - started:.0f} s: two "
            "with XOAUTH2 (the expired access token refreshed on the way), one with "
            "OAUTHBEARER."
        )
        say(f"  Messages: {self.maildir}")
        say("  Next: scripts/demo --serve keeps it running to click through the admin.")

    def prepare(self) -> None:
        step(1, "Prepare the example project")
        self.run_quietly("migrate", "migrate", "--no-input")
        say(f"  Database: {self.var_dir / 'db.sqlite3'} (migrations applied)")
        say("  Settings: example_project/settings.py, the dev provider, sender " + self.mailbox)

    def start_devserver(self) -> None:
        step(2, "Start the development OAuth2 + SMTP server (manage.py xoauth2_devserver)")
        for attempt in range(3):  # a free port can be taken before the server binds it
            # The dev provider's default ports when they are free: then the settings need
            # nothing. Else free ones, which the example's settings read from the environment.
            oauth_port = free_port(DEFAULT_OAUTH_PORT if attempt == 0 else 0)
            smtp_port = free_port(DEFAULT_SMTP_PORT if attempt == 0 else 0)
            self.env.pop("EXAMPLE_DEV_BASE_URL", None)
            self.env.pop("EXAMPLE_DEV_SMTP_PORT", None)
            if oauth_port != DEFAULT_OAUTH_PORT:
                self.env["EXAMPLE_DEV_BASE_URL"] = f"http://127.0.0.1:{oauth_port}"
            if smtp_port != DEFAULT_SMTP_PORT:
                self.env["EXAMPLE_DEV_SMTP_PORT"] = str(smtp_port)
            devserver = self.start(
                "devserver",
                "xoauth2_devserver",
                "--auto-approve",
                f"--token-lifetime={self.token_lifetime}",
                f"--maildir={self.maildir}",
                f"--state-file={self.maildir.parent / 'oauth-state.json'}",
            )
            try:
                devserver.wait_for(lambda line: line.startswith("Quit with CONTROL-C"), 30)
            except DemoError:
                if "already in use" not in "\n".join(devserver.lines):
                    raise
                continue
            for line in devserver.lines:
                say(f"  devserver | {line}")
            devserver.echo = True  # from now on its lines appear as they come
            self.devserver = devserver
            return
        raise DemoError("Could not start the development server on free ports (3 tries).")

    def connect(self) -> float:
        step(3, f"Connect {self.mailbox} through the consent flow")
        args = ["connect_mailbox", "dev", "--email", self.mailbox, "--no-browser"]
        say(f"  $ python manage.py {' '.join(args)}")
        command = self.start("connect_mailbox", *args, "--timeout", "60")
        command.echo = True
        url_line = command.wait_for(lambda line: URL.search(line) is not None, 60)
        url = URL.findall(url_line)[0]
        command.wait_until_quiet()  # the rest of its instructions, before ours
        say("  The demo plays the browser: it opens that URL, and the dev server approves at")
        say("  once (--auto-approve, with --email as login_hint) and redirects to the command.")
        response = requests.get(url, timeout=30)
        if not response.history:
            raise DemoError(
                f"The dev server answered the consent URL with HTTP {response.status_code} "
                "instead of redirecting: is it running with --auto-approve?"
            )
        redirect = response.history[0].headers.get("Location", "")
        say(f"  GET -> {response.history[0].status_code} to {redirect.split('?')[0]}?code=...")
        approved_at = time.time()
        if command.finish(90) != 0:
            raise DemoError(command.failure("failed"))
        return approved_at

    def send(
        self,
        subject: str,
        mechanism: str,
        *,
        expect_refresh: bool = False,
        sasl_mechanism: str | None = None,
    ) -> None:
        args = ["send_demo_mail", "--subject", subject]
        if sasl_mechanism:
            args += ["--sasl-mechanism", sasl_mechanism]
        say(f"  $ python manage.py {args[0]} --subject {subject!r} {' '.join(args[3:])}".rstrip())
        command = self.start("send_demo_mail", *args, "--to", "someone@example.com")
        command.echo = True
        if command.finish(60) != 0:
            raise DemoError(command.failure(f"failed (exit code {command.popen.returncode})"))
        lines = command.lines
        assert self.devserver is not None
        summary = self.devserver.wait_for(lambda line: repr(subject) in line, 15)
        eml = self.maildir / summary.rsplit(" ", 1)[-1]
        show_message(eml)
        if not any(f"over SMTP AUTH {mechanism}:" in line for line in lines):
            raise DemoError(f"That message did not go out with {mechanism}; see above.")
        if expect_refresh and not any("refreshed" in line for line in lines):
            raise DemoError("That send did not refresh the access token; see above.")

    def serve(self) -> None:
        step(STEPS, "Serve the example site (--serve)")
        self.run_quietly(
            "shell",
            "shell",
            "-c",
            "from django.contrib.auth.models import User\n"
            "user = User.objects.filter(username='admin').first() or "
            "User(username='admin', email='admin@example.com')\n"
            "user.is_staff = user.is_superuser = True\n"
            "user.set_password('admin')\n"
            "user.save()",
        )
        port = free_port(8000)
        site = self.start("runserver", "runserver", f"127.0.0.1:{port}", "--noreload")
        site.echo = True
        site.wait_for(lambda line: "Quit the server with" in line, 30)
        for label, value in [
            ("Site", f"http://127.0.0.1:{port}/  (send a message, reset a password)"),
            ("Admin", f"http://127.0.0.1:{port}/admin/  user admin, password admin"),
            ("Mailboxes", f"http://127.0.0.1:{port}/admin/django_xoauth2_mail/mailbox/"),
            ("Messages", f"{self.maildir}  (the dev server prints a line for each)"),
        ]:
            say(f"  {label:<10} {value}")
        say("  Stop everything with CONTROL-C.")
        while site.popen.poll() is None:
            time.sleep(0.5)
        raise DemoError(site.failure("stopped"))


def show_message(eml: Path) -> None:
    """The headers a reader cares about and the start of the body."""
    message = email.parser.BytesParser(policy=email.policy.default).parsebytes(eml.read_bytes())
    say(f"  Delivered: {eml} ({eml.stat().st_size} bytes)")
    for name in ("From", "To", "Subject", "Date", "Message-ID"):
        say(f"    {name + ':':<12} {message.get(name, '')}")
    body = message.get_body(preferencelist=("plain",))
    text = body.get_content() if body is not None else ""
    for line in text.strip().splitlines()[:3]:
        say(f"    | {line}")
