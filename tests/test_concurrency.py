"""The token lifecycle under real concurrency: processes and threads that all find the
same expired token cause exactly one refresh, and the rotated refresh token that ends up in
the row is the newest one the server issued.

Runs on SQLite (the default envs: the refresh lock is a no-op write that takes the
database write lock) and on PostgreSQL (the -postgres env: a row lock). This module
imports no models at the top: the child processes import it before ``django.setup()``.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from typing import Any

import pytest
import requests

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

SENDER = "sender@example.com"
PROCESSES = 4
THREADS = 16
# The token endpoint answers this slowly, so every sender arrives while the refresh runs.
TOKEN_DELAY = 0.5
DB_NAME_VARIABLE = "XOAUTH2_MAIL_TEST_DB_NAME"


def send_from_child(xoauth2_mail: dict[str, Any], start: Any, results: Any, number: int) -> None:
    """A separate process with its own Django and connection to the same test database."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    from django.conf import settings

    # pytest-django made the test database (or SQLite file) under another name: use it.
    settings.DATABASES["default"]["NAME"] = os.environ[DB_NAME_VARIABLE]
    import django

    django.setup()
    settings.XOAUTH2_MAIL = xoauth2_mail
    from django.core import mail
    from django.db import connection

    try:
        start.wait(timeout=60)
        results.put(("sent", mail.send_mail(f"P{number}", "Body", SENDER, ["to@example.org"])))
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put(("error", repr(exc)))
    finally:
        connection.close()


def expire(mailbox: Any) -> None:
    from django_xoauth2_mail.models import Mailbox

    Mailbox.objects.filter(pk=mailbox.pk).update(access_token_expires_at=None)


def assert_row_holds_the_newest_refresh_token(mailbox: Any, oauth2_server: Any, older: list[str]):
    """The server rotates: only the newest refresh token of the grant still works."""
    mailbox.refresh_from_db()

    def refresh(token: str) -> requests.Response:
        return requests.post(
            oauth2_server.token_url,
            data={"grant_type": "refresh_token", "refresh_token": token},
            auth=("test-client", "test-secret"),
            timeout=5,
        )

    for token in older:
        assert refresh(token).json()["error"] == "invalid_grant"
    assert refresh(mailbox.refresh_token).status_code == 200  # checked last: this rotates it


def test_processes_with_an_expired_token_cause_one_refresh(
    mailbox, oauth2_settings, oauth2_server, xoauth2_smtp_server, monkeypatch
):
    from django.db import connection

    monkeypatch.setenv(DB_NAME_VARIABLE, connection.settings_dict["NAME"])
    original = mailbox.refresh_token
    oauth2_server.token_response_delay = TOKEN_DELAY
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(PROCESSES), context.Queue()
    children = [
        context.Process(target=send_from_child, args=(oauth2_settings, start, results, n))
        for n in range(PROCESSES)
    ]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)

    assert outcomes == [("sent", 1)] * PROCESSES
    assert oauth2_server.token_request_count == 1
    assert len(xoauth2_smtp_server.messages) == PROCESSES
    assert len({attempt.token for attempt in xoauth2_smtp_server.auth_attempts}) == 1
    assert_row_holds_the_newest_refresh_token(mailbox, oauth2_server, [original])


def send_from_threads(count: int) -> list[Any]:
    """Send one message from each of ``count`` threads started at once; their outcomes."""
    from django.core import mail
    from django.db import connection

    start = threading.Barrier(count)
    outcomes: list[Any] = []

    def send(n: int) -> None:
        start.wait(timeout=30)
        try:
            outcomes.append(mail.send_mail(f"T{n}", "Body", SENDER, ["to@example.org"]))
        except Exception as exc:  # collected and asserted by the caller
            outcomes.append(exc)
        finally:
            connection.close()  # this thread's own connection

    threads = [threading.Thread(target=send, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def test_threads_with_an_expired_token_cause_one_refresh(
    mailbox, oauth2_server, xoauth2_smtp_server
):
    oauth2_server.token_response_delay = TOKEN_DELAY
    older = [mailbox.refresh_token]

    assert send_from_threads(THREADS) == [1] * THREADS
    assert oauth2_server.token_request_count == 1

    # Again from the rotated token, which must be the one the row kept.
    mailbox.refresh_from_db()
    older.append(mailbox.refresh_token)
    expire(mailbox)
    assert send_from_threads(THREADS) == [1] * THREADS
    assert oauth2_server.token_request_count == 2

    assert len(xoauth2_smtp_server.messages) == 2 * THREADS
    assert_row_holds_the_newest_refresh_token(mailbox, oauth2_server, older)
