"""Four real processes send from one mailbox at once; the SMTP server checks that its
RATE_LIMIT and MAX_SESSIONS held for all of them together, and that a second mailbox
of the same provider was not held back meanwhile. On SQLite (the default run) and on
PostgreSQL (the ``postgres`` run, ``./scripts/test py311-django52-postgres``).

This module imports no models at the top: the children import tests.sending.limits_child.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from typing import Any

import pytest

from django_xoauth2_mail.devserver import smtp as devserver_smtp
from django_xoauth2_mail.testing import ReceivedMessage, XOAuth2SMTPServer
from tests.sending.limits_child import (
    send_from_child,
    send_kept_alive_and_exit,
    send_kept_alive_and_stay,
)
from tests.smtp_sessions import SessionCounter, counting_protocol

FIRST, SECOND = "bulk@example.com", "alerts@example.com"
PROCESSES = 4
PER_PROCESS = 4
RATE_LIMIT = 3
MAX_SESSIONS = 2
WINDOW = 2.0  # seconds; production's is 60
SECOND_SENDERS = 2  # two messages from the second mailbox: under both of its caps


def run_processes(monkeypatch: Any, oauth2_server: Any, keep_alive: bool) -> None:
    from django.db import connection

    from tests.conftest import make_mailbox

    counter = SessionCounter()
    monkeypatch.setattr(devserver_smtp, "_XOAuth2Protocol", counting_protocol(counter))
    context = multiprocessing.get_context("spawn")
    start, turn, results = context.Barrier(PROCESSES), context.Event(), context.Queue()

    arrivals = itertools.count(1)

    def on_message(message: ReceivedMessage) -> None:  # on the server's one thread
        if message.mail_from == FIRST and next(arrivals) == RATE_LIMIT:
            turn.set()  # the first mailbox's window is full: now send from the second

    with XOAuth2SMTPServer(oauth2_server.validate_access_token, on_message=on_message) as server:
        config = {
            "db_name": connection.settings_dict["NAME"],
            "window": WINDOW,
            "first": FIRST,
            "second": SECOND,
            "per_process": PER_PROCESS,
            "second_senders": SECOND_SENDERS,
            "keep_alive": keep_alive,
            "xoauth2_mail": {
                "PROVIDERS": {
                    "oauth2": {
                        "CLIENT_ID": "test-client",
                        "CLIENT_SECRET": "test-secret",
                        "TOKEN_URL": oauth2_server.token_url,
                        "SMTP_HOST": "127.0.0.1",
                        "SMTP_PORT": server.port,
                        "SMTP_SECURITY": "none",
                        "RATE_LIMIT": RATE_LIMIT,
                        "MAX_SESSIONS": MAX_SESSIONS,
                    }
                },
                "LIMIT_WAIT": 60,
                "SESSION_LEASE": 5,  # renewed every 5/3 s during the run
            },
        }
        make_mailbox(oauth2_server, FIRST, fresh=True)
        make_mailbox(oauth2_server, SECOND, fresh=True)
        children = [
            context.Process(target=send_from_child, args=(config, n, start, turn, results))
            for n in range(PROCESSES)
        ]
        for child in children:
            child.start()
        outcomes = sorted(results.get(timeout=300) for _ in children)
        for child in children:
            child.join(timeout=30)
        messages = server.messages

    # Every process sent all of its messages, none failed for want of room.
    assert [outcome[:3] for outcome in outcomes] == [("ok", n, PER_PROCESS) for n in range(4)]
    seconds = [outcome[3] for outcome in outcomes]
    assert seconds == [[1]] * SECOND_SENDERS + [[]] * (PROCESSES - SECOND_SENDERS)
    first = sorted(m.received_at for m in messages if m.mail_from == FIRST)
    second = sorted(m.received_at for m in messages if m.mail_from == SECOND)
    assert len(first) == PROCESSES * PER_PROCESS and len(second) == SECOND_SENDERS

    # RATE_LIMIT at the server: no WINDOW holds more than RATE_LIMIT arrivals
    # (allowing SQLite's millisecond clock steps).
    for earlier, later in zip(first, first[RATE_LIMIT:], strict=False):
        assert (later - earlier).total_seconds() >= WINDOW - 0.002
    # MAX_SESSIONS at the server, over all four processes.
    assert counter.peak[FIRST] <= MAX_SESSIONS
    # The second mailbox, sent from while the first was throttled, never waited.
    assert [outcome[4] for outcome in outcomes] == [[]] * PROCESSES
    assert max(second) < max(first)


# Batches over several sessions (a bulk job), or one message a call over kept-alive
# sessions (web workers: idle sessions elsewhere give their slots to a waiting one).
MODES = pytest.mark.parametrize("keep_alive", [False, True], ids=["batches", "keep_alive"])


@MODES
@pytest.mark.django_db(transaction=True)
def test_four_processes_share_the_limits(monkeypatch, real_backend, oauth2_server, keep_alive):
    run_processes(monkeypatch, oauth2_server, keep_alive)


@pytest.mark.postgres
@pytest.mark.skipif(
    not os.environ.get("XOAUTH2_MAIL_TEST_POSTGRES"),
    reason="needs PostgreSQL: set XOAUTH2_MAIL_TEST_POSTGRES=1 and PGHOST/PGPORT/PGUSER",
)
@MODES
@pytest.mark.django_db(transaction=True)
def test_four_processes_share_the_limits_on_postgres(
    monkeypatch, real_backend, oauth2_server, keep_alive
):
    from django.db import connection

    assert connection.vendor == "postgresql"
    run_processes(monkeypatch, oauth2_server, keep_alive)


@pytest.mark.django_db(transaction=True)
def test_a_process_that_exits_gives_its_slots_back_at_once(
    real_backend, oauth2_settings, oauth2_server, xoauth2_smtp_server
):
    from django.db import connection
    from django.db.models.functions import Now

    from django_xoauth2_mail.models import SendingLease
    from tests.conftest import make_mailbox

    oauth2_settings["PROVIDERS"]["oauth2"]["MAX_SESSIONS"] = 1
    make_mailbox(oauth2_server, FIRST, fresh=True)
    config = {
        "db_name": connection.settings_dict["NAME"],
        "first": FIRST,
        "xoauth2_mail": oauth2_settings,
    }
    child = multiprocessing.get_context("spawn").Process(
        target=send_kept_alive_and_exit, args=(config,)
    )
    child.start()
    child.join(timeout=120)

    assert child.exitcode == 0 and len(xoauth2_smtp_server.messages) == 1
    # Not left to expire SESSION_LEASE (60 s) later: free now.
    slots = SendingLease.objects.filter(kind="session")
    assert slots.count() == 1 and slots.filter(expires_at__lte=Now(), holder="").count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_slot_of_a_killed_process_frees_itself(
    real_backend, oauth2_settings, oauth2_server, xoauth2_smtp_server
):
    from django.core.mail import EmailMessage
    from django.db import connection

    from django_xoauth2_mail.backends import EmailBackend
    from django_xoauth2_mail.models import Mailbox
    from django_xoauth2_mail.sending import leases
    from tests.conftest import make_mailbox

    oauth2_settings["PROVIDERS"]["oauth2"]["MAX_SESSIONS"] = 1
    oauth2_settings["SESSION_LEASE"] = 1.5  # below the checked minimum, to keep this short
    oauth2_settings["LIMIT_WAIT"] = 30
    make_mailbox(oauth2_server, FIRST, fresh=True)
    config = {
        "db_name": connection.settings_dict["NAME"],
        "first": FIRST,
        "xoauth2_mail": oauth2_settings,
    }
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=send_kept_alive_and_stay, args=(config, results))
    child.start()
    try:
        assert results.get(timeout=120) == 1
        mailbox_id = Mailbox.objects.get(email=FIRST).pk
        time.sleep(2)  # longer than a lease: the child's renewals keep its slot
        assert leases.try_take(mailbox_id, "session", 1, "someone", 60).number is None
    finally:
        child.kill()  # SIGKILL: no exit handler gives the slot back
        child.join(timeout=30)

    message = EmailMessage("After", "Body", FIRST, ["to@example.org"])
    assert EmailBackend().send_messages([message]) == 1  # once the lease ran out
    assert len(xoauth2_smtp_server.messages) == 2
