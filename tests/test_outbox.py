"""Queued sending end to end on SQLite: TaskEmailBackend stores and enqueues, a real
django-tasks-db worker (run in this process with ``db_worker --batch``) sends through
the real XOAUTH2 SMTP server, and the outbox records what happened."""

from __future__ import annotations

import datetime as dt
import email
import io
from typing import Any

import pytest
from django.core.mail import EmailMessage
from django.core.management import call_command
from django.utils import timezone

from django_xoauth2_mail import outbox, signals, tasks
from django_xoauth2_mail.backends import EmailBackend, TaskEmailBackend
from django_xoauth2_mail.exceptions import ConfigurationError, InvalidMessage, MailboxNotFound
from django_xoauth2_mail.models import Mailbox, MailboxStatus, OutboxMessage, OutboxStatus
from django_xoauth2_mail.sending.messages import message_bytes
from tests.conftest import SENDER

pytestmark = pytest.mark.django_db(transaction=True)


def run_worker() -> None:
    """One django-tasks-db worker that runs every ready task, then exits."""
    call_command(
        "db_worker", "--batch", "--no-startup-delay", "--interval=0", "--queue-name=*", verbosity=0
    )


def queue(*messages: EmailMessage, **options: Any) -> int:
    return TaskEmailBackend(**options).send_messages(list(messages))


def message(subject: str = "Hello", to: str = "to@example.org", **kwargs: Any) -> EmailMessage:
    return EmailMessage(subject, "Body", SENDER, [to], **kwargs)


@pytest.fixture
def fast_retries(oauth2_settings: dict[str, Any]) -> dict[str, Any]:
    oauth2_settings.update(SMTP_RETRY_DELAYS=[], OUTBOX_RETRY_DELAYS=[0.0], OUTBOX_MAX_ATTEMPTS=2)
    return oauth2_settings


def test_send_messages_queues_without_touching_the_network(
    mailbox, xoauth2_smtp_server, oauth2_server
):
    assert queue(message("One"), message("Two")) == 2

    assert xoauth2_smtp_server.messages == []
    assert xoauth2_smtp_server.auth_attempts == []
    assert oauth2_server.token_request_count == 0
    rows = list(OutboxMessage.objects.order_by("pk"))
    assert [row.status for row in rows] == [OutboxStatus.QUEUED] * 2
    assert [row.subject for row in rows] == ["One", "Two"]
    assert all(row.message_id.startswith("<") and row.mailbox == mailbox for row in rows)


def test_worker_sends_each_message_once_with_the_bytes_emailbackend_would_send(
    mailbox, xoauth2_smtp_server, oauth2_server
):
    fixed = {"Message-ID": "<fixed@example.com>", "Date": "Sun, 06 Dec 2026 04:00:00 -0000"}
    queued, direct = message("Queued", headers=fixed), message("Queued", headers=fixed)
    queue(queued)
    run_worker()
    run_worker()  # nothing left: a second worker pass sends nothing again

    (received,) = xoauth2_smtp_server.messages
    assert received.auth_user == SENDER
    assert received.rcpt_tos == ["to@example.org"]
    row = OutboxMessage.objects.get()
    assert row.status == OutboxStatus.SENT and row.sent_at is not None
    assert row.attempts == 1 and row.last_error == ""
    assert row.message_id == "<fixed@example.com>"
    EmailBackend().send_messages([direct])
    assert xoauth2_smtp_server.messages[1].data == received.data  # same bytes on the wire
    assert oauth2_server.token_request_count == 1


def test_a_bad_message_raises_and_nothing_of_the_call_is_queued(mailbox):
    with pytest.raises(InvalidMessage):
        queue(message("Good"), message("Bad\nBcc: victim@example.org"))
    with pytest.raises(MailboxNotFound):
        queue(message("Good"), EmailMessage("x", "y", "nobody@example.net", ["to@example.org"]))
    assert not OutboxMessage.objects.exists()


def test_options_are_checked_when_the_backend_is_built(mailbox):
    with pytest.raises(ConfigurationError, match="max_connections"):
        TaskEmailBackend(max_connections=4)
    with pytest.raises(ConfigurationError, match="tasks_backend='nope'"):
        TaskEmailBackend(tasks_backend="nope")
    with pytest.raises(ConfigurationError, match="queue_name='missing'"):
        TaskEmailBackend(queue_name="missing")


def test_queue_options_reach_the_task(mailbox, xoauth2_smtp_server):
    from django_tasks_db.models import DBTaskResult

    queue(message(), queue_name="mail", priority=5)
    task = DBTaskResult.objects.get()
    assert (task.queue_name, task.priority) == ("mail", 5)
    run_worker()
    assert len(xoauth2_smtp_server.messages) == 1


def test_post_send_fires_from_the_worker(mailbox, xoauth2_smtp_server):
    received: list[dict[str, Any]] = []

    def receiver(**kwargs: Any) -> None:
        received.append(kwargs)

    signals.post_send.connect(receiver)
    try:
        queue(message("Signalled"))
        assert received == []
        run_worker()
    finally:
        signals.post_send.disconnect(receiver)
    (call,) = received
    assert call["sender"] is OutboxMessage and call["sent"] is True
    assert call["message"]["Subject"] == "Signalled"
    assert call["outbox_message"].pk == OutboxMessage.objects.get().pk
    assert call["mailbox"] == mailbox and call["undetermined"] is False


def test_temporary_failure_is_retried_then_given_up(mailbox, xoauth2_smtp_server, fast_retries):
    xoauth2_smtp_server.scripted_replies["MAIL"] = ["451 4.3.0 try later"] * 2
    queue(message())
    run_worker()  # attempt 1 fails for now, attempt 2 (due at once) fails too

    row = OutboxMessage.objects.get()
    assert row.status == OutboxStatus.FAILED
    assert row.attempts == 2
    assert "Gave up after 2 attempts" in row.last_error and "451" in row.last_error
    assert xoauth2_smtp_server.messages == []


def test_temporary_failure_then_success(mailbox, xoauth2_smtp_server, fast_retries):
    xoauth2_smtp_server.scripted_replies["MAIL"] = ["451 4.3.0 try later"]
    queue(message())
    run_worker()

    row = OutboxMessage.objects.get()
    assert (row.status, row.attempts) == (OutboxStatus.SENT, 2)
    assert len(xoauth2_smtp_server.messages) == 1


def test_retry_waits_for_its_backoff(mailbox, xoauth2_smtp_server, fast_retries):
    fast_retries["OUTBOX_RETRY_DELAYS"] = [3600]
    xoauth2_smtp_server.scripted_replies["MAIL"] = ["451 4.3.0 try later"]
    queue(message())
    run_worker()

    row = OutboxMessage.objects.get()
    assert row.status == OutboxStatus.QUEUED and row.attempts == 1
    assert "451" in row.last_error
    assert row.next_attempt_at > timezone.now() + dt.timedelta(minutes=59)
    assert xoauth2_smtp_server.messages == []


def test_permanent_refusal_fails_at_once(mailbox, xoauth2_smtp_server, fast_retries):
    xoauth2_smtp_server.reject_recipients["to@example.org"] = "550 5.1.1 no such user"
    queue(message())
    run_worker()

    row = OutboxMessage.objects.get()
    assert (row.status, row.attempts) == (OutboxStatus.FAILED, 1)
    assert "550" in str(row.refused_recipients)


def test_reconnect_required_holds_messages_failed_until_resent(
    mailbox, xoauth2_smtp_server, oauth2_server, fast_retries
):
    Mailbox.objects.filter(pk=mailbox.pk).update(
        status=MailboxStatus.RECONNECT_REQUIRED, last_error="invalid_grant"
    )
    queue(message())
    run_worker()
    row = OutboxMessage.objects.get()
    assert row.status == OutboxStatus.FAILED and "must be reconnected" in row.last_error

    Mailbox.objects.filter(pk=mailbox.pk).update(status=MailboxStatus.CONNECTED)
    assert outbox.resend([row.pk]) == [row.pk]
    tasks.enqueue(OutboxMessage.objects.filter(pk=row.pk))
    run_worker()
    row.refresh_from_db()
    assert row.status == OutboxStatus.SENT
    assert len(xoauth2_smtp_server.messages) == 1


def test_no_reply_after_the_end_of_data_is_undetermined_and_not_resent(
    mailbox, xoauth2_smtp_server, fast_retries
):
    fast_retries["SMTP_TIMEOUT"] = 1
    xoauth2_smtp_server.scripted_replies["DATA_END"] = ["HANG"]
    queue(message())
    run_worker()
    tasks.recover_stalled(force=True)
    run_worker()

    row = OutboxMessage.objects.get()
    assert row.status == OutboxStatus.UNDETERMINED
    assert "Resend" in row.last_error
    assert len(xoauth2_smtp_server.messages) == 1  # it did arrive, once


def claim_as_a_dead_worker(row: OutboxMessage, *, data_sent: bool) -> str:
    token = outbox.claim(row.pk)
    assert token is not None
    if data_sent:
        assert outbox.mark_end_of_data(row.pk, token)
    OutboxMessage.objects.filter(pk=row.pk).update(
        lease_expires_at=timezone.now() - dt.timedelta(seconds=1)
    )
    return token


def test_a_claim_whose_lease_ran_out_before_data_is_sent_again(mailbox, xoauth2_smtp_server):
    queue(message())
    row = OutboxMessage.objects.get()
    claim_as_a_dead_worker(row, data_sent=False)
    run_worker()  # the original task finds the message taken: nothing sent
    assert xoauth2_smtp_server.messages == []

    assert tasks.recover_stalled(force=True) == (1, 0)
    run_worker()
    row.refresh_from_db()
    assert (row.status, row.attempts) == (OutboxStatus.SENT, 2)
    assert len(xoauth2_smtp_server.messages) == 1


def test_a_claim_whose_lease_ran_out_after_data_is_undetermined(mailbox, xoauth2_smtp_server):
    queue(message())
    row = OutboxMessage.objects.get()
    claim_as_a_dead_worker(row, data_sent=True)

    assert tasks.recover_stalled(force=True) == (0, 1)
    run_worker()
    row.refresh_from_db()
    assert row.status == OutboxStatus.UNDETERMINED
    assert xoauth2_smtp_server.messages == []


def test_a_stalled_worker_that_lost_its_claim_does_not_send(mailbox, xoauth2_smtp_server):
    queue(message())
    row = OutboxMessage.objects.select_related("mailbox").get()
    stale = claim_as_a_dead_worker(row, data_sent=False)
    tasks.recover_stalled(force=True)  # taken back while the stalled worker "sleeps"

    # The stalled worker wakes up and goes on: its check-in before the data fails.
    assert tasks._deliver(row, stale) == tasks.CLAIM_LOST
    assert xoauth2_smtp_server.messages == []
    row.refresh_from_db()
    assert row.status == OutboxStatus.QUEUED  # still the new claim's to send
    run_worker()
    assert len(xoauth2_smtp_server.messages) == 1


def test_message_bytes_are_stored_exactly(mailbox):
    fixed = {"Message-ID": "<u@example.com>", "Date": "Sun, 06 Dec 2026 04:00:00 -0000"}
    queue(message("Ünïcode", headers=fixed))
    row = OutboxMessage.objects.get()
    # What the running Django's own SMTP backend would send (it differs by version).
    assert bytes(row.data) == message_bytes(message("Ünïcode", headers=fixed))
    assert row.message_id == "<u@example.com>"
    assert row.subject == "Ünïcode"


def test_retry_outbox_takes_back_stalled_claims_and_lost_tasks(
    mailbox, xoauth2_smtp_server, settings
):
    from django_tasks_db.models import DBTaskResult

    queue(message("Stalled"), message("Undetermined"), message("Lost task"))
    stalled, undetermined, lost = OutboxMessage.objects.order_by("pk")
    claim_as_a_dead_worker(stalled, data_sent=False)
    claim_as_a_dead_worker(undetermined, data_sent=True)
    DBTaskResult.objects.all().delete()  # e.g. the process died before enqueueing
    OutboxMessage.objects.filter(pk=lost.pk).update(
        next_attempt_at=timezone.now() - dt.timedelta(seconds=301)
    )
    out = io.StringIO()
    call_command("retry_outbox", stdout=out)
    assert "Enqueued 2 outbox message(s) again." in out.getvalue()
    assert "Marked 1 message(s) undetermined" in out.getvalue()
    call_command("retry_outbox", stdout=io.StringIO())  # again at once: nothing more
    assert DBTaskResult.objects.count() == 2

    run_worker()
    assert sorted(
        email.message_from_bytes(m.data)["Subject"] for m in xoauth2_smtp_server.messages
    ) == [
        "Lost task",
        "Stalled",
    ]
    statuses = dict(OutboxMessage.objects.values_list("subject", "status"))
    assert statuses == {
        "Stalled": OutboxStatus.SENT,
        "Undetermined": OutboxStatus.UNDETERMINED,
        "Lost task": OutboxStatus.SENT,
    }


def test_retry_outbox_leaves_a_backlog_alone(mailbox, xoauth2_smtp_server):
    from django_tasks_db.models import DBTaskResult

    queue(message("Waiting"))  # its task waits in the queue, behind a long backlog
    OutboxMessage.objects.update(next_attempt_at=timezone.now() - dt.timedelta(hours=1))
    call_command("retry_outbox", stdout=io.StringIO())
    assert DBTaskResult.objects.count() == 1
    run_worker()
    assert len(xoauth2_smtp_server.messages) == 1


def test_workers_take_back_stalled_claims_themselves(mailbox, xoauth2_smtp_server):
    queue(message("Stalled"), message("Next"))
    stalled = OutboxMessage.objects.order_by("pk").first()
    assert stalled is not None
    claim_as_a_dead_worker(stalled, data_sent=False)
    tasks._last_recovery = 0.0  # as in a worker process that just started
    run_worker()  # "Next"'s task notices the stalled claim and enqueues it again
    assert sorted(OutboxMessage.objects.values_list("status", flat=True)) == ["sent", "sent"]
    assert len(xoauth2_smtp_server.messages) == 2


def test_a_message_queued_on_a_machine_whose_clock_runs_ahead_is_sent(mailbox, xoauth2_smtp_server):
    queue(message())
    OutboxMessage.objects.update(next_attempt_at=timezone.now() + dt.timedelta(seconds=2))
    run_worker()
    assert OutboxMessage.objects.get().status == OutboxStatus.SENT
    assert len(xoauth2_smtp_server.messages) == 1


def test_a_capped_mailbox_defers_without_using_attempts(
    settings, mailbox, xoauth2_smtp_server, fast_retries, monkeypatch
):
    """RATE_LIMIT reached: the worker does not sit out the window (it runs one task at a
    time, other mailboxes wait behind it); it defers the message until room is expected,
    and a deferral is not a failed attempt."""
    monkeypatch.setattr(tasks, "WORKER_LIMIT_WAIT", 0.2)
    settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["RATE_LIMIT"] = 1
    settings.XOAUTH2_MAIL["OUTBOX_MAX_ATTEMPTS"] = 1
    queue(message("First"), message("Second"))

    run_worker()

    assert len(xoauth2_smtp_server.messages) == 1
    first, second = OutboxMessage.objects.order_by("pk")
    assert first.status == OutboxStatus.SENT
    assert second.status == OutboxStatus.QUEUED and second.attempts == 0
    assert "RATE_LIMIT" in second.last_error
    # Room is expected when the first message's minute is over, not before.
    assert second.next_attempt_at > timezone.now() + dt.timedelta(seconds=30)
