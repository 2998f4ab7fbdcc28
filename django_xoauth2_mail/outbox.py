"""The outbox's bookkeeping: every state change of a queued message, each one a
single conditional UPDATE, so workers on any number of machines agree without
holding locks across network calls.

    queued --claim--> sending --finish--> sent | failed | queued (retry later)
                        |
                        +-- lease ran out, data not yet sent --> queued
                        +-- lease ran out after end_of_data_at --> undetermined

A claim writes a random ``claimed_by`` and a lease. Just before a message's
data goes out, its worker records ``end_of_data_at``, but only while its
claim still holds: a message taken back from a stalled worker is withdrawn,
never sent twice. A claim whose lease ran out is recovered by whoever looks
next (a worker, or ``retry_outbox``): re-queued if its data never went out,
marked undetermined if it may have.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import secrets
from collections.abc import Callable, Iterable, Sequence

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.models import Mailbox, OutboxMessage, OutboxStatus
from django_xoauth2_mail.sending.messages import Envelope

UNDETERMINED_REASON = (
    "The worker sending this message stopped after the end of the message may have "
    "reached the SMTP server, so it may or may not have been delivered. It was not sent "
    "again, to avoid a duplicate: check with a recipient, and use Resend if it did not "
    "arrive."
)


@dataclasses.dataclass(frozen=True)
class QueueOptions:
    """Where a message's tasks go (TaskEmailBackend's options)."""

    tasks_backend: str = "default"
    queue_name: str = "default"
    priority: int = 0


def store(
    items: Sequence[tuple[Envelope, Mailbox, str, str]], options: QueueOptions
) -> list[OutboxMessage]:
    """Save (envelope, mailbox, Message-ID, subject) items as queued rows, in one go."""
    rows = [
        OutboxMessage(
            message_id=message_id[:998],
            mailbox=mailbox,
            subject=subject[:255],
            sender=envelope.sender,
            recipients=list(envelope.recipients),
            data=envelope.data,
            smtputf8=envelope.smtputf8,
            tasks_backend=options.tasks_backend,
            queue_name=options.queue_name,
            priority=options.priority,
        )
        for envelope, mailbox, message_id, subject in items
    ]
    with transaction.atomic():
        return OutboxMessage.objects.bulk_create(rows)


def envelope_of(row: OutboxMessage) -> Envelope:
    return Envelope(
        sender=row.sender,
        recipients=tuple(row.recipients),
        data=bytes(row.data),
        smtputf8=row.smtputf8,
    )


# Machines' clocks differ a little: a message queued on a machine whose clock runs
# ahead must not look "not yet due" to the worker that receives its task at once.
CLOCK_SKEW = dt.timedelta(seconds=5)


def claim(pk: int) -> str | None:
    """Take a due queued message for this worker; its claim token, or None."""
    now = timezone.now()
    token = secrets.token_hex(16)
    claimed = OutboxMessage.objects.filter(
        pk=pk, status=OutboxStatus.QUEUED, next_attempt_at__lte=now + CLOCK_SKEW
    ).update(
        status=OutboxStatus.SENDING,
        claimed_by=token,
        lease_expires_at=_lease_end(now),
        end_of_data_at=None,
        attempts=F("attempts") + 1,
        updated_at=now,
    )
    return token if claimed else None


def mark_end_of_data(pk: int, token: str) -> bool:
    """Record that the data is about to go out; False if the claim was lost."""
    now = timezone.now()
    return bool(
        OutboxMessage.objects.filter(pk=pk, claimed_by=token, status=OutboxStatus.SENDING).update(
            end_of_data_at=now, lease_expires_at=_lease_end(now), updated_at=now
        )
    )


def finish(pk: int, token: str, status: str, **fields: object) -> bool:
    """Record the outcome of a claim; False if it was lost meanwhile.

    A message marked undetermined (its lease ran out after its data went out)
    still takes its worker's late answer: sent or failed is better knowledge.
    """
    now = timezone.now()
    updated = OutboxMessage.objects.filter(
        pk=pk,
        claimed_by=token,
        status__in=[OutboxStatus.SENDING, OutboxStatus.UNDETERMINED],
    ).update(status=status, lease_expires_at=None, updated_at=now, **fields)
    return bool(updated)


def retry_later(pk: int, token: str, attempts: int, error: str) -> dt.datetime | None:
    """Queue a temporarily failed message again, after its backoff; None if it
    has used its attempts (it is then failed) or the claim was lost."""
    if attempts >= max(1, conf.OUTBOX_MAX_ATTEMPTS):
        finish(
            pk,
            token,
            OutboxStatus.FAILED,
            last_error=f"Gave up after {attempts} attempts. Last error: {error}",
        )
        return None
    return _queue_again(pk, token, retry_delay(attempts), error)


def defer(pk: int, token: str, seconds: float, error: str) -> dt.datetime | None:
    """Queue a message again after ``seconds`` without using up one of its attempts:
    it was not tried (its mailbox's shared RATE_LIMIT or MAX_SESSIONS had no room).
    None if the claim was lost."""
    return _queue_again(pk, token, seconds, error, attempts=F("attempts") - 1)  # claim() counted it


def _queue_again(
    pk: int, token: str, seconds: float, error: str, **fields: object
) -> dt.datetime | None:
    due = timezone.now() + dt.timedelta(seconds=seconds)
    requeued = finish(
        pk,
        token,
        OutboxStatus.QUEUED,
        claimed_by="",
        end_of_data_at=None,
        next_attempt_at=due,
        last_error=error,
        **fields,
    )
    return due if requeued else None


def retry_delay(attempts: int) -> float:
    """Seconds before the next try, with jitter: a deferred task jumps ahead of
    never-deferred ones in some queues, so many retries falling due at once
    would starve everything else."""
    delays = conf.OUTBOX_RETRY_DELAYS or (60.0,)
    base = delays[min(attempts - 1, len(delays) - 1)]
    return base * random.uniform(1.0, 1.25)  # noqa: S311 - spreading, not secrecy


def recover_expired(now: dt.datetime | None = None) -> tuple[list[int], int]:
    """Take back the claims of workers that stopped answering.

    Returns the pks put back in the queue (to enqueue again) and how many were
    marked undetermined.
    """
    now = now or timezone.now()
    expired = OutboxMessage.objects.filter(status=OutboxStatus.SENDING, lease_expires_at__lt=now)
    undetermined = expired.filter(end_of_data_at__isnull=False).update(
        status=OutboxStatus.UNDETERMINED, last_error=UNDETERMINED_REASON, updated_at=now
    )
    requeued = []
    for pk in expired.filter(end_of_data_at__isnull=True).values_list("pk", flat=True):
        # One at a time, conditional: a worker may finish it meanwhile.
        if OutboxMessage.objects.filter(
            pk=pk, status=OutboxStatus.SENDING, lease_expires_at__lt=now
        ).update(status=OutboxStatus.QUEUED, claimed_by="", next_attempt_at=now, updated_at=now):
            requeued.append(pk)
    return requeued, undetermined


def lost_tasks(
    still_waiting: Callable[[OutboxMessage], bool], now: dt.datetime | None = None
) -> list[int]:
    """Queued messages due for longer than a lease whose task is lost (a process
    that died between saving the rows and enqueueing, a Tasks backend that
    dropped it, one that cannot defer retries). ``still_waiting`` asks the
    Tasks backend about a row's task, so a long backlog is left alone. Each
    one found is stamped, so concurrent callers do not all enqueue it again."""
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=conf.OUTBOX_LEASE)
    due = []
    candidates = OutboxMessage.objects.filter(
        status=OutboxStatus.QUEUED, next_attempt_at__lt=cutoff
    ).only("pk", "next_attempt_at", "tasks_backend", "task_id")
    for row in candidates.iterator():
        if still_waiting(row):
            continue
        pk, next_attempt_at = row.pk, row.next_attempt_at
        if OutboxMessage.objects.filter(
            pk=pk, status=OutboxStatus.QUEUED, next_attempt_at=next_attempt_at
        ).update(next_attempt_at=now):
            due.append(pk)
    return due


def resend(pks: Iterable[int]) -> list[int]:
    """Queue messages again on an admin's request (failed, undetermined, or
    even sent); a message being sent right now is left alone."""
    now = timezone.now()
    done = []
    for pk in pks:
        if (
            OutboxMessage.objects.filter(pk=pk)
            .filter(~Q(status=OutboxStatus.SENDING))
            .update(
                status=OutboxStatus.QUEUED,
                claimed_by="",
                end_of_data_at=None,
                attempts=0,
                next_attempt_at=now,
                updated_at=now,
            )
        ):
            done.append(pk)
    return done


def _lease_end(now: dt.datetime) -> dt.datetime:
    return now + dt.timedelta(seconds=conf.OUTBOX_LEASE)
