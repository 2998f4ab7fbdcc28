"""The benchmark's quick mode (what CI runs) works end to end.

It runs the real thing in a subprocess: the sink process, the OAuth2 server, the three
clients. Speed targets are reported, not asserted (machines differ); what must hold is
that it runs, and that every message arrived exactly once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.run import HEADER

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_benchmark_runs_and_delivers_every_message_once() -> None:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    # The benchmark chooses its own settings module; pytest-django's must not leak in.
    environment.pop("DJANGO_SETTINGS_MODULE", None)
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert HEADER in completed.stdout, output
    assert "delivered exactly once" in completed.stdout, output
