"""The queued case: TaskEmailBackend and four django-tasks-db ``db_worker`` processes
against the 10 ms sink, next to ``EmailBackend`` with ``max_connections=4`` in the same
run (four workers, four sessions: the same parallelism).

The queued figure runs from the start of ``send_messages()`` (storing and enqueueing)
to the sink's receipt of the last message. The workers run already, warmed up by one
message each way, so process start-up is not counted. Both share the benchmark's
SQLite database (WAL mode, see settings.py), as a small site would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKERS = 4
SINK = "10 ms"
CASE = f"queued, {WORKERS} workers"
DIRECT = f"batch, max_connections={WORKERS}"
QUEUED_LABEL = "TaskEmailBackend"
WAIT = 300.0  # seconds for the workers to send one batch, at most


def available() -> bool:
    from django.apps import apps

    return apps.is_installed("django_tasks_db")


def run_queued(bench: Any, count: int, directory: str) -> None:
    """Add the two rows (direct, then queued with the direct one as its baseline)."""
    from benchmarks import run

    if not available():
        bench.report.notes.append(
            "Queued case skipped: django-tasks-db is not installed "
            '(pip install "django-xoauth2-mail[tasks]", plus "django-tasks-db[compat]" on '
            "Django 5.2)."
        )
        return
    run.progress(f"{SINK}: {DIRECT} and {CASE}")
    direct_tag = bench.tag(f"{DIRECT} {SINK}")
    tally = run.Tally()
    ids = [run.message_id(direct_tag, n) for n in range(count)]
    bench.batch(SINK, run.OURS_LABEL, ids, {"max_connections": WORKERS}, tally)
    bench.verify(direct_tag, count, f"{DIRECT} / {SINK}", SINK)
    direct = bench.add(run.Row(DIRECT, SINK, run.OURS_LABEL, count, tally.rounds[0]))
    direct.cpu = tally.cpu()

    workers = start_workers(bench.setup, directory)
    try:
        queued_tag = bench.tag(f"{CASE} {SINK}")
        warm_up = [run.message_id(queued_tag, count + n) for n in range(WORKERS)]
        send_queued(bench, warm_up, queued_tag, already=0)
        started = time.perf_counter()
        timed = [run.message_id(queued_tag, n) for n in range(count)]
        send_queued(bench, timed, queued_tag, already=WORKERS)
        seconds = time.perf_counter() - started
    finally:
        stop_workers(workers)
    bench.verify(queued_tag, count + WORKERS, f"{CASE} / {SINK}", SINK)
    bench.add(run.Row(CASE, SINK, QUEUED_LABEL, count, seconds, baseline=direct))
    bench.report.notes.append(
        f"{CASE}: its 'vs Django' figure compares it with this backend's {DIRECT} "
        "(its rate / that rate), not with Django."
    )


def send_queued(bench: Any, ids: list[str], tag: str, *, already: int) -> None:
    from django.core.mail import get_connection

    from benchmarks import run

    run.point_at(bench.setup, SINK, run.OURS)
    backend = get_connection("django_xoauth2_mail.backends.TaskEmailBackend")
    queued = backend.send_messages([run.make_message(mid) for mid in ids])
    if queued != len(ids):
        bench.report.problems.append(f"{CASE}: {queued} of {len(ids)} queued")
    wanted = already + len(ids)
    deadline = time.monotonic() + WAIT
    while sum(bench.sink.stats(f"<{tag}.")["counts"].values()) < wanted:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{CASE}: the workers did not send {wanted} messages in {WAIT} s")
        time.sleep(0.02)


def start_workers(setup: Any, directory: str) -> list[subprocess.Popen[bytes]]:
    """db_worker processes with the run's mail settings (written to a settings module)."""
    from django.conf import settings

    from benchmarks import run

    run.point_at(setup, SINK, run.OURS)
    Path(directory, "queued_settings.py").write_text(
        f"from benchmarks.settings import *  # noqa\nXOAUTH2_MAIL = {settings.XOAUTH2_MAIL!r}\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "queued_settings",
        "PYTHONPATH": os.pathsep.join([directory, str(root)]),
    }
    command = [sys.executable, "-m", "django", "db_worker", "--no-startup-delay"]
    command += ["--interval=0.01", "--queue-name=*", "--verbosity=0"]
    log = open(Path(directory, "workers.log"), "ab")  # noqa: SIM115 - closed with the run
    return [
        subprocess.Popen([*command, f"--worker-id=bench{n}"], env=env, stdout=log, stderr=log)
        for n in range(WORKERS)
    ]


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
