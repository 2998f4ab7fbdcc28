"""Child processes whose output the demo reads line by line, and what it prints."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
MANAGE = ROOT / "example_project" / "manage.py"


class DemoError(Exception):
    """A step failed; the message says which and what to look at."""


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    bold = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    say(f"\n\033[1m{text}\033[0m" if bold else f"\n{text}")


def free_port(preferred: int = 0) -> int:
    """``preferred`` if it is free on 127.0.0.1, else a port the OS picks."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as sock:
            # As the servers bind: a port left in TIME_WAIT by the last run counts as free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise DemoError("No free TCP port on 127.0.0.1.")


class Process:
    """A child process whose output lines are collected (and echoed) by a thread."""

    def __init__(self, label: str, args: list[str], env: dict[str, str]) -> None:
        self.label = label
        self.lines: list[str] = []
        self.echo = False
        self._changed = threading.Condition()
        # A session of its own: Ctrl-C reaches only the demo, which stops children in order.
        self.popen = subprocess.Popen(
            [sys.executable, str(MANAGE), *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.rstrip("\n")
            with self._changed:
                self.lines.append(line)
                if self.echo:
                    say(f"  {self.label} | {line}")
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """The first line (old or new) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if predicate(line):
                        return line
                if not self._reader.is_alive():
                    raise DemoError(self.failure(f"exited ({self.popen.wait()})"))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DemoError(self.failure(f"gave no expected output in {timeout:g} s"))
                self._changed.wait(remaining)

    def wait_until_quiet(self, quiet: float = 0.3, limit: float = 3.0) -> None:
        """Wait until no line came for ``quiet`` seconds (at most ``limit``)."""
        deadline = time.monotonic() + limit
        with self._changed:
            while time.monotonic() < deadline:
                count = len(self.lines)
                self._changed.wait(quiet)
                if len(self.lines) == count:
                    return

    def finish(self, timeout: float) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DemoError(self.failure(f"did not finish within {timeout:g} s")) from None
        self._reader.join(5)
        return code

    def failure(self, what: str) -> str:
        if self.echo:  # its output is on the screen already
            return f"{self.label} {what}; its output is above."
        output = "\n".join(f"    {line}" for line in self.lines[-40:])
        return f"{self.label} {what}. Its output:\n{output}"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._reader.join(5)
