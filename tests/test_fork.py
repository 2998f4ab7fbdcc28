"""A process that forks after using the backend (a pre-forking server started from a
long-lived process, django-post_office's ``--processes``): every child gets its own mail
loop, thread pools and locks, and sends, through a refused token and from async code."""

from __future__ import annotations

import asyncio
import multiprocessing
import warnings
from typing import Any

import pytest
from django.core import mail
from django.db import connections

from tests.conftest import SENDER

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

CHILDREN = 3
DEADLINE = 60.0


def send_sync(subject: str) -> int:
    return mail.send_mail(subject, "Body", SENDER, ["to@example.org"])


async def send_from_async(subject: str) -> int:
    # send_mail() from a thread whose event loop runs (an async view): the sync worker pool.
    return send_sync(subject)


def child(number: int, results: Any) -> None:
    try:
        sent = send_sync(f"child {number} sync")  # meets a 535: the refresh runs here
        sent += asyncio.run(send_from_async(f"child {number} async"))
        results.put((number, sent))
    except BaseException as exc:  # reported to the parent, which asserts on it
        results.put((number, repr(exc)))
    finally:
        connections.close_all()


def test_forked_children_send_through_a_refused_token(mailbox, oauth2_server, xoauth2_smtp_server):
    # The parent goes through every process-wide path first: a refused token (535, then a
    # refresh), and a send from async code (the sync worker threads).
    oauth2_server.expire_access_tokens()
    assert send_sync("parent sync") == 1
    assert asyncio.run(send_from_async("parent async")) == 1
    oauth2_server.expire_access_tokens()  # every child's cached token is refused now

    connections.close_all()  # what a pre-forking server does: no shared DB socket
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=child, args=(n, results)) for n in range(CHILDREN)]
    with warnings.catch_warnings():
        # Python 3.12+ warns that fork() in a process with threads may deadlock the
        # child: that condition is exactly what this test puts the package through.
        warnings.simplefilter("ignore", DeprecationWarning)
        for process in children:
            process.start()
    try:
        outcomes = sorted(results.get(timeout=DEADLINE) for _ in children)
    finally:
        for process in children:
            process.join(timeout=10)
            if process.is_alive():  # hung: kill it, the assertion below says why
                process.kill()

    assert outcomes == [(n, 2) for n in range(CHILDREN)]
    assert len(xoauth2_smtp_server.messages) == 2 + 2 * CHILDREN
