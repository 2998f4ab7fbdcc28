"""Real django-tasks-db ``db_worker`` processes on the test database, for the tests of
queued sending, and the waits that go with them.

Run as ``python -m tests.db_workers ARGS``, this module is one such worker: it sets
Django up, applies the test knobs it finds in the environment (a short limits window,
a short WORKER_LIMIT_WAIT: module constants a settings file cannot reach), then runs
``db_worker ARGS``. It imports nothing of Django at the top for that reason.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WINDOW_ENV = "XOAUTH2_MAIL_TEST_WINDOW"
LIMIT_WAIT_ENV = "XOAUTH2_MAIL_TEST_WORKER_LIMIT_WAIT"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def outbox_counts() -> collections.Counter[str]:
    """How many outbox messages are in each status."""
    from django_xoauth2_mail.models import OutboxMessage

    return collections.Counter(OutboxMessage.objects.values_list("status", flat=True))


class DBWorkers:
    """Starts ``db_worker`` processes with the given XOAUTH2_MAIL on the test database;
    ``stop()`` ends those still running (SIGTERM, then SIGKILL after 20 s)."""

    def __init__(self, tmp_path: Path, xoauth2_mail: dict[str, Any]) -> None:
        from django.db import connection

        self.tmp_path = tmp_path
        self.processes: list[subprocess.Popen[bytes]] = []
        (tmp_path / "worker_settings.py").write_text(
            "from tests.settings import *  # noqa\n"
            f"DATABASES['default']['NAME'] = {connection.settings_dict['NAME']!r}\n"
            f"XOAUTH2_MAIL = {xoauth2_mail!r}\n"
        )

    def start(
        self, count: int, *, window: float | None = None, limit_wait: float | None = None
    ) -> list[subprocess.Popen[bytes]]:
        """``window``: the limits' WINDOW in seconds (60 in production);
        ``limit_wait``: tasks.WORKER_LIMIT_WAIT."""
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "worker_settings",
            "PYTHONPATH": os.pathsep.join([str(self.tmp_path), str(ROOT)]),
        }
        if window is not None:
            env[WINDOW_ENV] = str(window)
        if limit_wait is not None:
            env[LIMIT_WAIT_ENV] = str(limit_wait)
        started = []
        for _ in range(count):
            number = len(self.processes)
            log = open(self.tmp_path / f"worker{number}.log", "wb")  # noqa: SIM115
            command = [sys.executable, "-m", "tests.db_workers", "--no-startup-delay"]
            command += ["--interval=0.05", "--queue-name=*", f"--worker-id=w{number}"]
            process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
            self.processes.append(process)
            started.append(process)
        return started

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main() -> None:
    import django

    django.setup()
    from django.core.management import execute_from_command_line

    from django_xoauth2_mail import tasks
    from django_xoauth2_mail.sending import limits

    if WINDOW_ENV in os.environ:
        limits.WINDOW = float(os.environ[WINDOW_ENV])
    if LIMIT_WAIT_ENV in os.environ:
        tasks.WORKER_LIMIT_WAIT = float(os.environ[LIMIT_WAIT_ENV])
    execute_from_command_line([sys.argv[0], "db_worker", *sys.argv[1:]])


if __name__ == "__main__":
    main()
