"""Queued sending under a mailbox's shared limits: four real ``db_worker`` processes send
the messages TaskEmailBackend queued from two mailboxes, one whose provider sets a low
RATE_LIMIT and MAX_SESSIONS, one with no caps. The SMTP server checks that the capped
mailbox's caps held across the four workers, that every message arrived exactly once
(the workers defer a capped message and run it again later), and that the uncapped
mailbox was not held back behind the capped one. On SQLite (the default run) and on
PostgreSQL (the ``postgres`` run, ``./scripts/test py311-django52-postgres``).
"""

from __future__ import annotations

import collections
import email
import os
from pathlib import Path
from typing import Any

import pytest
from django.core.mail import EmailMessage

from django_xoauth2_mail.backends import TaskEmailBackend
from django_xoauth2_mail.devserver import smtp as devserver_smtp
from django_xoauth2_mail.models import Mailbox, OutboxMessage, OutboxStatus
from django_xoauth2_mail.testing import XOAuth2SMTPServer
from tests.conftest import make_mailbox
from tests.db_workers import DBWorkers, outbox_counts, wait_until
from tests.smtp_sessions import SessionCounter, counting_protocol

CAPPED, UNCAPPED = "bulk@example.com", "alerts@example.com"
WORKERS = 4
PER_MAILBOX = 12
RATE_LIMIT = 3
MAX_SESSIONS = 2
WINDOW = 2.0  # seconds; production's is 60
# Seconds a worker waits for room before deferring (5 in production): short, so
# deferrals, and the re-runs of deferred messages, happen within the test.
LIMIT_WAIT = 0.5


def run_workers(monkeypatch: Any, tmp_path: Path, oauth2_server: Any) -> None:
    from django_tasks_db.models import DBTaskResult

    counter = SessionCounter()
    monkeypatch.setattr(devserver_smtp, "_XOAuth2Protocol", counting_protocol(counter))
    with XOAuth2SMTPServer(oauth2_server.validate_access_token) as server:
        smtp = {"SMTP_HOST": "127.0.0.1", "SMTP_PORT": server.port, "SMTP_SECURITY": "none"}
        client = {
            "CLIENT_ID": "test-client",
            "CLIENT_SECRET": "test-secret",
            "TOKEN_URL": oauth2_server.token_url,
        }
        xoauth2_mail = {
            "PROVIDERS": {
                # Limits are a provider's: the capped mailbox is on "oauth2", the
                # uncapped one on "dev" (no RATE_LIMIT, no MAX_SESSIONS by default).
                "oauth2": {
                    **client,
                    **smtp,
                    "RATE_LIMIT": RATE_LIMIT,
                    "MAX_SESSIONS": MAX_SESSIONS,
                },
                "dev": {**client, **smtp},
            },
            "SESSION_LEASE": 5,  # renewed every 5/3 s during the run
        }
        make_mailbox(oauth2_server, CAPPED, fresh=True)
        uncapped = make_mailbox(oauth2_server, UNCAPPED, fresh=True)
        Mailbox.objects.filter(pk=uncapped.pk).update(provider="dev")
        # Interleaved, as a site's mail would be: the uncapped mailbox's tasks sit
        # among the capped one's, not ahead of them.
        messages = [
            EmailMessage(f"{prefix}{n}", "Body", sender, ["to@example.org"])
            for n in range(PER_MAILBOX)
            for prefix, sender in (("A", CAPPED), ("B", UNCAPPED))
        ]
        assert TaskEmailBackend().send_messages(messages) == 2 * PER_MAILBOX

        workers = DBWorkers(tmp_path, xoauth2_mail)
        try:
            workers.start(WORKERS, window=WINDOW, limit_wait=LIMIT_WAIT)

            def settled() -> bool:
                state = outbox_counts()
                return state[OutboxStatus.QUEUED] + state[OutboxStatus.SENDING] == 0

            wait_until(settled, 60, "the workers to send every message")
        finally:
            workers.stop()
        received = server.messages

    # Nothing left queued or sending, nothing failed: every message sent, once.
    assert outbox_counts() == {OutboxStatus.SENT: 2 * PER_MAILBOX}
    arrivals = collections.Counter(email.message_from_bytes(m.data)["Subject"] for m in received)
    assert arrivals == collections.Counter(OutboxMessage.objects.values_list("subject", flat=True))
    assert set(arrivals.values()) == {1}

    capped = sorted(m.received_at for m in received if m.auth_user == CAPPED)
    free = sorted(m.received_at for m in received if m.auth_user == UNCAPPED)
    assert len(capped) == len(free) == PER_MAILBOX
    # RATE_LIMIT at the server: no WINDOW holds more than RATE_LIMIT arrivals
    # (allowing SQLite's millisecond clock steps).
    for earlier, later in zip(capped, capped[RATE_LIMIT:], strict=False):
        assert (later - earlier).total_seconds() >= WINDOW - 0.002
    # MAX_SESSIONS at the server, over all four workers.
    assert counter.peak[CAPPED] <= MAX_SESSIONS
    # The uncapped mailbox was not slowed by the capped one's waits and deferrals: its
    # messages were all in before the capped mailbox's last window.
    assert max(free) < capped[-RATE_LIMIT]
    # The workers deferred capped messages and ran them again: more tasks than messages.
    assert DBTaskResult.objects.count() > 2 * PER_MAILBOX
    assert OutboxMessage.objects.filter(attempts__gt=1).count() == 0  # deferrals are free


@pytest.mark.django_db(transaction=True)
def test_four_workers_keep_one_mailboxs_limits_and_not_the_others(
    monkeypatch, tmp_path, oauth2_server
):
    run_workers(monkeypatch, tmp_path, oauth2_server)


@pytest.mark.postgres
@pytest.mark.skipif(
    not os.environ.get("XOAUTH2_MAIL_TEST_POSTGRES"),
    reason="needs PostgreSQL: set XOAUTH2_MAIL_TEST_POSTGRES=1 and PGHOST/PGPORT/PGUSER",
)
@pytest.mark.django_db(transaction=True)
def test_four_workers_keep_one_mailboxs_limits_and_not_the_others_on_postgres(
    monkeypatch, tmp_path, oauth2_server
):
    from django.db import connection

    assert connection.vendor == "postgresql"
    run_workers(monkeypatch, tmp_path, oauth2_server)
