"""Queued sending with real workers on PostgreSQL: four ``db_worker`` processes send 500
messages from two mailboxes through the XOAUTH2 SMTP server while one of them is
SIGKILLed mid-run. Every message arrives exactly once, except those marked
undetermined (at most one per kill, each arrived at most once); nothing is left queued
or sending; each mailbox's token is refreshed once.

Run with XOAUTH2_MAIL_TEST_POSTGRES=1 and PGHOST/PGPORT/PGUSER pointing at a server
(``./scripts/test py311-django52-postgres`` starts one); skipped otherwise.
"""

from __future__ import annotations

import collections
import email
import io
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.mail import EmailMessage
from django.core.management import call_command

from django_xoauth2_mail.backends import TaskEmailBackend
from django_xoauth2_mail.models import OutboxMessage, OutboxStatus
from tests.conftest import make_mailbox
from tests.db_workers import DBWorkers, outbox_counts, wait_until

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not os.environ.get("XOAUTH2_MAIL_TEST_POSTGRES"),
        reason="needs PostgreSQL: set XOAUTH2_MAIL_TEST_POSTGRES=1 and PGHOST/PGPORT/PGUSER",
    ),
    pytest.mark.django_db(transaction=True),
]

WORKERS = 4
MESSAGES = 500
SENDERS = ("first@example.com", "second@example.com")
# Short, so the killed worker's message comes back within the test.
LEASE = 5


@pytest.fixture
def workers(tmp_path: Path, oauth2_settings: dict[str, Any]) -> Iterator[Any]:
    """Starts WORKERS db_worker processes on the test database, with these settings."""
    oauth2_settings.update(OUTBOX_LEASE=LEASE)
    started = DBWorkers(tmp_path, oauth2_settings)
    yield lambda: started.start(WORKERS)
    started.stop()


def test_four_workers_one_killed_every_message_exactly_once(
    workers, oauth2_server, xoauth2_smtp_server
):
    for address in SENDERS:
        make_mailbox(oauth2_server, address)  # no access token yet: each needs one refresh
    messages = [
        EmailMessage(f"M{number}", "Body", SENDERS[number % 2], [f"to{number}@example.org"])
        for number in range(MESSAGES)
    ]
    assert TaskEmailBackend().send_messages(messages) == MESSAGES

    processes = workers()
    wait_until(lambda: len(xoauth2_smtp_server.messages) >= MESSAGES // 5, 120, "sending")
    victim = processes[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    kills = 1

    def settled() -> bool:
        state = outbox_counts()
        return state[OutboxStatus.QUEUED] == 0 and state[OutboxStatus.SENDING] <= kills

    wait_until(settled, 180, "the other workers to send the rest")
    # The killed worker's claim (if it held one) is taken back once its lease runs
    # out: by retry_outbox here, as cron would (busy workers also do it themselves).
    time.sleep(LEASE + 0.5)
    call_command("retry_outbox", stdout=io.StringIO())
    wait_until(
        lambda: outbox_counts()[OutboxStatus.QUEUED] + outbox_counts()[OutboxStatus.SENDING] == 0,
        60,
        "the taken-back message to be sent",
    )

    state = outbox_counts()
    assert state[OutboxStatus.FAILED] == 0, list(
        OutboxMessage.objects.filter(status=OutboxStatus.FAILED).values_list("last_error")
    )
    assert state[OutboxStatus.UNDETERMINED] <= kills
    assert state[OutboxStatus.SENT] + state[OutboxStatus.UNDETERMINED] == MESSAGES
    arrivals = collections.Counter(
        email.message_from_bytes(message.data)["Subject"]
        for message in xoauth2_smtp_server.messages
    )
    statuses = dict(OutboxMessage.objects.values_list("subject", "status"))
    for subject, status in statuses.items():
        if status == OutboxStatus.SENT:
            assert arrivals[subject] == 1, subject
        else:
            assert arrivals[subject] <= 1, subject
    assert set(arrivals) <= set(statuses)
    # One refresh per mailbox (the tokens outlive the test), across four processes.
    assert oauth2_server.token_request_count == len(SENDERS)
    senders = {message.auth_user for message in xoauth2_smtp_server.messages}
    assert senders == set(SENDERS)
