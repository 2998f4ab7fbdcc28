"""Queued sending on Django's Tasks framework: the task a worker runs for each
outbox message, and enqueueing it.

Any Tasks backend runs ``send_outbox_message`` (django-tasks-db's
``db_worker``, RQ, Celery, ...). The task sends through the same path as
``EmailBackend`` (sending/dispatch.py, sessions, tokens), one message per
task: a worker killed mid-task leaves at most one message in doubt.
Exactly-once does not depend on the task queue: a task whose message was
already taken, sent, or is not yet due does nothing, so a task that runs
twice, or an extra one from ``retry_outbox``, is harmless.
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import logging
import random
import time
from collections.abc import Iterable

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from django_xoauth2_mail import outbox, signals, tokens
from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.exceptions import (
    ConfigurationError,
    MailboxDisconnected,
    MailboxReconnectRequired,
    SendingLimitReached,
    SMTPAuthenticationFailed,
    XOAuth2MailError,
)
from django_xoauth2_mail.models import Mailbox, OutboxMessage, OutboxStatus
from django_xoauth2_mail.providers import get_provider
from django_xoauth2_mail.sending.dispatch import Dispatcher, MailboxJob, SendOptions
from django_xoauth2_mail.sending.loop import mail_loop, run_orm
from django_xoauth2_mail.sending.session import DeliveryResult
from django_xoauth2_mail.sending.transaction import TRANSIENT_CODES

try:  # Django 6.0+
    from django.tasks import task, task_backends
except ImportError:  # Django 5.2: the django-tasks backport
    try:
        from django_tasks import (  # type: ignore[no-redef,assignment,import-not-found,unused-ignore]
            task,
            task_backends,
        )
    except ImportError as exc:
        raise ConfigurationError(
            "Queued sending (TaskEmailBackend, retry_outbox) needs Django's Tasks framework: "
            "Django 6.0+ has it; on Django 5.2 install the backport with "
            'pip install "django-xoauth2-mail[tasks]" "django-tasks-db[compat]".'
        ) from exc

logger = logging.getLogger(__name__)

# A worker keeps its SMTP session this many idle seconds for the next task of
# the same mailbox: long enough for a busy queue, short enough not to sit on
# one of a mailbox's few allowed sessions while the queue is quiet.
WORKER_KEEP_ALIVE = 10.0
# Seconds a worker waits for room under its mailbox's shared limits before deferring.
WORKER_LIMIT_WAIT = 5.0
# Each worker looks for stalled claims at most this often (a fraction of the lease).
RECOVERY_EVERY = 0.1
_last_recovery = 0.0
LAST_SENT_RESOLUTION = dt.timedelta(seconds=60)
# What a worker that stalled past its lease reports: the message is another's now.
CLAIM_LOST = "claim lost: the message was taken back after this worker's lease ran out"


@task()
def send_outbox_message(message_pk: int) -> str:
    """Send one queued message; returns the status it ended in (or why not)."""
    recover_stalled()
    token = outbox.claim(message_pk)
    if token is None:
        return "not claimable: sent, taken by another worker, or not due yet"
    row = OutboxMessage.objects.select_related("mailbox").get(pk=message_pk)
    return _deliver(row, token)


def enqueue(rows: Iterable[OutboxMessage], run_after: dt.datetime | None = None) -> None:
    """Enqueue one task per message, with each message's queue options."""
    enqueued = []
    for row in rows:
        configured = send_outbox_message.using(
            backend=row.tasks_backend, queue_name=row.queue_name, priority=row.priority
        )
        if run_after is not None and task_backends[row.tasks_backend].supports_defer:
            configured = configured.using(run_after=run_after)
        row.task_id = str(configured.enqueue(row.pk).id or "")[:64]
        enqueued.append(row)
    # One statement for the lot (retry_outbox reads them).
    OutboxMessage.objects.bulk_update(enqueued, ["task_id"], batch_size=500)


def task_still_waiting(row: OutboxMessage) -> bool:
    """Whether the row's task waits in its queue (only backends that keep results
    can tell; for others, and for a task that is running, failed or gone, no)."""
    backend = task_backends[row.tasks_backend]
    if not (row.task_id and backend.supports_get_result):
        return False
    try:
        status = backend.get_result(row.task_id).status
    except Exception:  # TaskResultDoesNotExist, or a backend that cannot say
        return False
    # RUNNING is not waiting: django-tasks-db leaves a killed worker's task RUNNING.
    return str(status) == "READY"


def check_queue_options(options: outbox.QueueOptions) -> None:
    """Refuse, when the backend is built, options no task could be enqueued with."""
    try:
        send_outbox_message.using(
            backend=options.tasks_backend,
            queue_name=options.queue_name,
            priority=options.priority,
        )
    except Exception as exc:  # InvalidTaskBackend(Error), InvalidTaskError, TypeError
        raise ConfigurationError(
            "TaskEmailBackend cannot enqueue its tasks with tasks_backend="
            f"{options.tasks_backend!r}, queue_name={options.queue_name!r}, priority="
            f"{options.priority!r}: {exc}. Check settings.TASKS (the alias, its QUEUES, "
            "whether it supports priorities) and the backend's options."
        ) from exc


def enqueue_on_commit(rows: list[OutboxMessage]) -> None:
    """Enqueue once the rows are committed: a worker must find them."""
    transaction.on_commit(lambda: enqueue(rows))


def recover_stalled(force: bool = False, lost_tasks: bool = False) -> tuple[int, int]:
    """Take back stalled claims and re-enqueue them; (requeued, undetermined).

    Runs at the start of tasks, at most every ``RECOVERY_EVERY`` lease per
    process, so stalled messages come back while workers run; ``lost_tasks``
    (retry_outbox) also enqueues again queued messages whose task is lost.
    """
    global _last_recovery
    now = time.monotonic()
    if not force and now - _last_recovery < conf.OUTBOX_LEASE * RECOVERY_EVERY:
        return 0, 0
    _last_recovery = now
    requeued, undetermined = outbox.recover_expired()
    if lost_tasks:
        requeued += outbox.lost_tasks(task_still_waiting)
    if requeued:
        enqueue(OutboxMessage.objects.filter(pk__in=requeued))
    if requeued or undetermined:
        logger.warning(
            "Outbox: took back %d stalled message(s) for sending again; %d marked "
            "undetermined (their data may have reached the server).",
            len(requeued),
            undetermined,
        )
    return len(requeued), undetermined


_dispatcher: Dispatcher | None = None


def _worker_dispatcher() -> Dispatcher:
    global _dispatcher
    options = SendOptions(
        timeout=conf.SMTP_TIMEOUT,
        keep_alive=WORKER_KEEP_ALIVE,
        retry_delays=conf.SMTP_RETRY_DELAYS,
        # A worker runs one task at a time: waiting long for a capped mailbox would hold
        # up every other mailbox's mail. It defers the message instead (_record_error).
        limit_wait=WORKER_LIMIT_WAIT,
    )
    if _dispatcher is None or _dispatcher.options != options:
        _dispatcher = Dispatcher(options)
    return _dispatcher


def _deliver(row: OutboxMessage, token: str) -> str:
    mailbox = row.mailbox
    try:
        tokens.get_access_token(mailbox)  # a refresh happens here, under the row lock
        job = _job_for(row, token)
        mail_loop.run(_worker_dispatcher().run([job]))
    except XOAuth2MailError as exc:
        return _record_error(row, token, exc)
    if 0 in job.errors:
        return _record_error(row, token, job.errors[0])
    return _record_result(row, token, job.results[0])


def _job_for(row: OutboxMessage, token: str) -> MailboxJob:
    mailbox = row.mailbox
    provider = get_provider(mailbox.provider)
    pk = row.pk

    async def before_end_of_data(index: int) -> bool:
        return await run_orm(outbox.mark_end_of_data, pk, token)

    job = MailboxJob(
        mailbox,
        provider.smtp_endpoint,
        rate_limit=provider.rate_limit,
        max_sessions=provider.max_sessions_per_mailbox,
        before_end_of_data=before_end_of_data,
    )
    job.items.append((0, outbox.envelope_of(row)))
    return job


def _record_result(row: OutboxMessage, token: str, result: DeliveryResult) -> str:
    refused = {rcpt: list(reply) for rcpt, reply in result.refused.items()}
    if result.delivered:
        partial = f"These recipients were refused: {_refused_text(result)}" if refused else ""
        status, fields = OutboxStatus.SENT, {"sent_at": timezone.now(), "last_error": partial}
        _record_mailbox_sent(row.mailbox)
    elif result.undetermined:
        status = OutboxStatus.UNDETERMINED
        fields = {"last_error": f"{outbox.UNDETERMINED_REASON} ({result.error})"}
    elif result.transient:
        return _retry(row, token, result.error or "temporary failure", result)
    else:
        status, fields = OutboxStatus.FAILED, {"last_error": result.error or "not delivered"}
    if not outbox.finish(row.pk, token, status, refused_recipients=refused, **fields):
        return CLAIM_LOST
    _post_send(row, result)
    return status


def _record_error(row: OutboxMessage, token: str, error: Exception) -> str:
    """A failure before any message data: the mailbox, its token, the connection."""
    result = DeliveryResult(error=str(error))
    if isinstance(error, SendingLimitReached):
        return _defer(row, token, error)
    if _is_permanent(error):
        if not outbox.finish(row.pk, token, OutboxStatus.FAILED, last_error=str(error)):
            return CLAIM_LOST
        _post_send(row, result)
        return OutboxStatus.FAILED
    return _retry(row, token, str(error), result)


def _is_permanent(error: Exception) -> bool:
    # Waiting does not fix these: an admin reconnects the mailbox or fixes the
    # settings, then resends (the Outbox admin's Resend action).
    if isinstance(error, MailboxReconnectRequired | MailboxDisconnected | ConfigurationError):
        return True
    return isinstance(error, SMTPAuthenticationFailed) and error.smtp_code not in TRANSIENT_CODES


def _retry(row: OutboxMessage, token: str, error: str, result: DeliveryResult) -> str:
    attempts = OutboxMessage.objects.values_list("attempts", flat=True).get(pk=row.pk)
    due = outbox.retry_later(row.pk, token, attempts, error)
    if due is None:
        row.refresh_from_db(fields=["status"])
        if row.status == OutboxStatus.FAILED:
            _post_send(row, result)
        return row.status
    enqueue([row], run_after=due)
    logger.info("Outbox message %s failed for now (%s); next try after %s", row.pk, error, due)
    return OutboxStatus.QUEUED


def _defer(row: OutboxMessage, token: str, error: SendingLimitReached) -> str:
    # Until room is expected (RATE_LIMIT says when), or a few seconds for a session slot,
    # with jitter: capped messages re-deferred together would jump ahead of every
    # never-deferred task in some queues and starve the other mailboxes.
    wait = error.retry_after if error.retry_after is not None else WORKER_LIMIT_WAIT
    due = outbox.defer(row.pk, token, wait * random.uniform(1.0, 1.5) + 1.0, str(error))
    if due is None:
        return CLAIM_LOST
    enqueue([row], run_after=due)
    logger.info("Outbox message %s waits for its mailbox's limits until %s", row.pk, due)
    return OutboxStatus.QUEUED


def _post_send(row: OutboxMessage, result: DeliveryResult) -> None:
    # The worker has the exact bytes, not the caller's EmailMessage: receivers
    # get the message as sent (headers as message["Subject"]) and the row.
    message = email.message_from_bytes(bytes(row.data), policy=email.policy.default)
    signals.post_send.send(
        sender=OutboxMessage,
        message=message,
        mailbox=row.mailbox,
        sent=result.delivered,
        error=result.error,
        refused_recipients=dict(result.refused),
        undetermined=result.undetermined,
        outbox_message=row,
    )


def _refused_text(result: DeliveryResult) -> str:
    return ", ".join(f"{r} ({code} {reply})" for r, (code, reply) in result.refused.items())


def _record_mailbox_sent(mailbox: Mailbox) -> None:
    # last_sent_at is bookkeeping, not a log: at most one write a minute per
    # mailbox however many messages the workers send.
    now = timezone.now()
    if mailbox.last_sent_at and now - mailbox.last_sent_at < LAST_SENT_RESOLUTION:
        return
    stale = Q(last_sent_at__isnull=True) | Q(last_sent_at__lt=now - LAST_SENT_RESOLUTION)
    Mailbox.objects.filter(stale, pk=mailbox.pk).update(last_sent_at=now)
