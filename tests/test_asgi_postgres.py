"""send_mail() from an async view under a real ASGI server (uvicorn) on PostgreSQL with
CONN_MAX_AGE=0: no database connection is left open between requests, and a database that
dropped every session (a restart, a failover, idle_session_timeout) is reconnected to."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from django.db import connection

from tests.conftest import SENDER, make_mailbox

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not os.environ.get("XOAUTH2_MAIL_TEST_POSTGRES"),
        reason="needs PostgreSQL: set XOAUTH2_MAIL_TEST_POSTGRES=1 and PGHOST/PGPORT/PGUSER",
    ),
    pytest.mark.django_db(transaction=True),
]

ROOT = Path(__file__).resolve().parent.parent
STARTUP_DEADLINE = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def uvicorn_server(tmp_path, oauth2_settings, oauth2_server, xoauth2_smtp_server) -> Iterator[str]:
    db = dict(connection.settings_dict, CONN_MAX_AGE=0)
    db = {k: db[k] for k in ("ENGINE", "NAME", "HOST", "PORT", "USER", "PASSWORD", "CONN_MAX_AGE")}
    (tmp_path / "asgi_settings.py").write_text(
        textwrap.dedent(f"""\
            from tests.settings import *  # noqa: F403
            DATABASES = {{"default": {db!r}}}
            XOAUTH2_MAIL = {dict(oauth2_settings)!r}
            DEFAULT_FROM_EMAIL = {SENDER!r}
        """)
    )
    port = free_port()
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="asgi_settings",
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "tests.asgi_app:application",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/send-from-async-view/"
    deadline = time.monotonic() + STARTUP_DEADLINE
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    output = process.communicate()[0]
                    raise AssertionError(f"uvicorn did not start: {output}") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def other_sessions(settle: float = 5.0) -> list[tuple[int, str]]:
    """Sessions on the test database other than this test's own (pid, last query).

    A server process lingers a moment after its client closed the connection, so an
    open session must still be there after ``settle`` seconds to count.
    """
    deadline = time.monotonic() + settle
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
            sessions = [(int(pid), str(query)) for pid, query in cursor.fetchall()]
        if not sessions or time.monotonic() > deadline:
            return sessions
        time.sleep(0.1)


def test_async_view_sends_and_keeps_no_connection(
    oauth2_server, xoauth2_smtp_server, uvicorn_server
):
    make_mailbox(oauth2_server, fresh=True)

    for attempt in range(3):
        response = requests.get(uvicorn_server, timeout=30)
        assert (response.status_code, response.text) == (200, "1"), response.text
        assert other_sessions() == [], f"a connection stayed open after request {attempt}"

    assert len(xoauth2_smtp_server.messages) == 3


def test_async_view_survives_terminated_database_sessions(
    settings, oauth2_server, xoauth2_smtp_server, uvicorn_server
):
    make_mailbox(oauth2_server, fresh=True)
    assert requests.get(uvicorn_server, timeout=30).text == "1"

    # What a database restart or failover does to every open session.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )

    for _ in range(3):
        response = requests.get(uvicorn_server, timeout=30)
        assert (response.status_code, response.text) == (200, "1"), response.text
    assert len(xoauth2_smtp_server.messages) == 4
