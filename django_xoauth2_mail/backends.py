"""The Django email backend: Django's API, mailbox choice, and the hand-over
to the mail loop that runs the SMTP sessions.

A call goes through three phases. ``_prepare`` runs in the caller's thread
(it uses the ORM): it converts every message, picks each one's Mailbox and
makes sure its access token is fresh. ``_transmit`` runs on the mail loop
(see loop.py): one SMTP session per mailbox, mailboxes in parallel.
``_finish`` runs in the caller's thread again: signals, bookkeeping, and the
exception that says exactly what was and was not delivered.
"""

from __future__ import annotations

import datetime as dt
import email.policy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from typing import Any, TypeVar

import django
from asgiref.sync import sync_to_async
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.db import router, transaction
from django.utils import timezone

from django_xoauth2_mail import outbox, signals, tokens
from django_xoauth2_mail.conf import conf, require_installed_app
from django_xoauth2_mail.exceptions import (
    ConfigurationError,
    MailboxNotFound,
    MessageFailure,
    SendError,
    XOAuth2MailError,
)
from django_xoauth2_mail.models import Mailbox, normalize_address
from django_xoauth2_mail.providers import get_provider
from django_xoauth2_mail.sending.dispatch import Dispatcher, MailboxJob, SendOptions
from django_xoauth2_mail.sending.loop import (
    event_loop_running_here,
    mail_loop,
    run_blocking_in_worker,
)
from django_xoauth2_mail.sending.messages import Envelope, build_envelope, sender_candidates
from django_xoauth2_mail.sending.session import DeliveryResult

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Django 6.1's BaseEmailBackend takes ``alias`` and rejects unknown options itself.
BASE_TAKES_ALIAS = django.VERSION >= (6, 1)
# last_sent_at is bookkeeping, not a log: write it at most this often per mailbox.
LAST_SENT_RESOLUTION = dt.timedelta(seconds=60)


@dataclass
class _Batch:
    messages: Sequence[EmailMessage]
    jobs: dict[int, MailboxJob] = field(default_factory=dict)  # by mailbox pk
    # Messages that no mailbox can send (their sender has none): failed, not sent.
    unsendable: dict[int, Exception] = field(default_factory=dict)


class EmailBackend(BaseEmailBackend):
    """Sends through the Mailbox that matches each message's sender, over
    SMTP authenticated with OAuth2 (XOAUTH2)."""

    def __init__(
        self,
        fail_silently: bool = False,
        *,
        mailbox: str | None = None,
        timeout: float | None = None,
        max_connections: int = 1,
        keep_alive: bool | float = False,
        rate_limit: int | None = None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> None:
        require_installed_app()  # the settings may have changed since this module loaded
        if BASE_TAKES_ALIAS:
            # fail_silently is kept here, not passed up: Django 6.1 deprecates
            # it in the base class but send_mail() still hands it to backends.
            super().__init__(**kwargs)
        else:
            if kwargs:
                names = ", ".join(repr(name) for name in kwargs)
                raise ConfigurationError(
                    f"django_xoauth2_mail.backends.EmailBackend got unknown options {names}; "
                    f"it accepts {', '.join(OPTIONS)}."
                )
            super().__init__(fail_silently=fail_silently)
        if password is not None:
            raise ConfigurationError(
                "django_xoauth2_mail.backends.EmailBackend authenticates with OAuth2 tokens "
                "and takes no password (send_mail(auth_password=...) or EMAIL_HOST_PASSWORD "
                "has no meaning here). Remove the password; to choose the sending mailbox "
                "pass auth_user= or the backend's 'mailbox' option."
            )
        self.fail_silently = fail_silently
        # send_mail(auth_user=...) reaches a backend as ``username``: it names a mailbox.
        self.mailbox = mailbox or username
        self.rate_limit = rate_limit
        self.dispatcher = Dispatcher(
            SendOptions(
                timeout=float(timeout) if timeout is not None else conf.SMTP_TIMEOUT,
                max_connections=_positive_int("max_connections", max_connections),
                keep_alive=_keep_alive_seconds(keep_alive),
                retry_delays=conf.SMTP_RETRY_DELAYS,
            )
        )

    @property
    def timeout(self) -> float:
        timeout: float = self.dispatcher.options.timeout
        return timeout

    # Django's connection API ------------------------------------------------

    def open(self) -> bool:
        """Keep SMTP sessions open across send_messages() calls until close()."""
        if self.dispatcher.holding:
            return False
        self.dispatcher.holding = True
        return True

    def close(self) -> None:
        self.dispatcher.holding = False
        if self.dispatcher.holds_sessions:  # nothing to say QUIT to otherwise
            self._call_blocking(mail_loop.run, self.dispatcher.close())

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        messages = list(email_messages or [])
        if not messages:
            return 0
        return self._call_blocking(self._send_blocking, messages)

    async def asend_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """``send_messages()`` for async code: never blocks the caller's event loop."""
        messages = list(email_messages or [])
        if not messages:
            return 0
        batch = await sync_to_async(self._prepare)(messages)
        await mail_loop.arun(self.dispatcher.run(list(batch.jobs.values())))
        return await sync_to_async(self._finish)(batch)

    @staticmethod
    def _call_blocking(function: Callable[..., T], *args: Any) -> T:
        if event_loop_running_here():
            # An async view called send_mail(): Django forbids the ORM in this
            # thread, so do the (blocking, by contract) work in a worker thread.
            return run_blocking_in_worker(function, *args)
        return function(*args)

    def _send_blocking(self, messages: Sequence[EmailMessage]) -> int:
        batch = self._prepare(messages)
        mail_loop.run(self.dispatcher.run(list(batch.jobs.values())))
        return self._finish(batch)

    # Phase 1: prepare (caller's thread) ------------------------------------

    def _prepare(self, messages: Sequence[EmailMessage]) -> _Batch:
        batch = _Batch(messages)
        converted, batch.unsendable = self._convert(messages)
        for index, (envelope, mailbox) in converted.items():
            job = batch.jobs.get(mailbox.pk)
            if job is None:
                provider = get_provider(mailbox.provider, mailbox=mailbox.email)
                job = batch.jobs[mailbox.pk] = MailboxJob(
                    mailbox,
                    provider.smtp_endpoint,
                    rate_limit=self.rate_limit or provider.rate_limit,
                    max_sessions=provider.max_sessions_per_mailbox,
                )
            job.items.append((index, envelope))
        for job in batch.jobs.values():
            self._get_ready(batch, job)
        return batch

    def _convert(
        self, messages: Sequence[EmailMessage]
    ) -> tuple[dict[int, tuple[Envelope, Mailbox]], dict[int, Exception]]:
        """Each sendable message's envelope and Mailbox, by index, and the messages no
        mailbox can send (their error). Raises, before anything is sent, for a message
        that cannot be sent at all (an invalid address, header injection)."""
        envelopes = {}
        for index, message in enumerate(messages):
            if message.recipients():
                envelopes[index] = build_envelope(message, index)
            else:  # skipped, as Django's SMTP backend does, but not silently
                logger.warning(
                    "Message #%d (%r) has no recipients: not sent.", index, message.subject
                )
        mailboxes, unsendable = self._pick_mailboxes({i: messages[i] for i in envelopes})
        converted = {
            i: (envelope, mailboxes[i]) for i, envelope in envelopes.items() if i in mailboxes
        }
        return converted, unsendable

    def _pick_mailboxes(
        self, messages: dict[int, EmailMessage]
    ) -> tuple[dict[int, Mailbox], dict[int, Exception]]:
        """Each message's Mailbox, and the error of each message whose sender has none."""
        candidates = {index: list(sender_candidates(m)) for index, m in messages.items()}
        fallbacks = [normalize_address(a) for a in (self.mailbox, conf.DEFAULT_MAILBOX) if a]
        wanted = {address for addresses in candidates.values() for address in addresses}
        known = {mb.email: mb for mb in Mailbox.objects.filter(email__in=wanted | set(fallbacks))}
        chosen: dict[int, Mailbox] = {}
        unsendable: dict[int, Exception] = {}
        for index, addresses in candidates.items():
            for address in [*addresses, *fallbacks]:
                if address in known:
                    chosen[index] = known[address]
                    break
            else:
                error = MailboxNotFound(
                    f"No mailbox can send message #{index} from "
                    f"{messages[index].from_email!r}: no Mailbox has that address"
                    + (f" nor the fallback {', '.join(fallbacks)}" if fallbacks else "")
                    + ". Connect one with `python manage.py connect_mailbox <provider>`, or name "
                    "an existing one in the backend's 'mailbox' option or "
                    "XOAUTH2_MAIL['DEFAULT_MAILBOX']. This message was not sent.",
                    mailbox=addresses[0] if addresses else None,
                )
                # Loud even under fail_silently (AdminEmailHandler sends with it from
                # SERVER_EMAIL): a site that cannot send its error reports must hear of it.
                logger.error("%s", error)
                unsendable[index] = error
        return chosen, unsendable

    def _get_ready(self, batch: _Batch, job: MailboxJob) -> None:
        try:
            tokens.get_access_token(job.mailbox)
        except XOAuth2MailError as exc:
            if isinstance(exc, ConfigurationError):
                raise
            for index, _ in job.items:
                job.errors[index] = exc
            job.items = []
            return
        ready = []
        for index, envelope in job.items:
            try:
                signals.pre_send.send(
                    sender=type(self), message=batch.messages[index], mailbox=job.mailbox
                )
            except Exception as exc:  # the signal's contract: that message fails, alone
                logger.warning("A pre_send receiver failed message #%d: %r", index, exc)
                job.errors[index] = exc
            else:
                ready.append((index, envelope))
        job.items = ready

    # Phase 3: finish (caller's thread) ----------------------------------------

    def _finish(self, batch: _Batch) -> int:
        """Tell the truth about every message: the count, ``post_send``, the exception.

        Runs whatever happened on the mail loop (the dispatcher records failures
        per message instead of raising), so a failure mid-batch never hides what
        the server had already accepted.
        """
        sent = 0
        errors: dict[int, Exception] = dict(batch.unsendable)
        results: dict[int, DeliveryResult] = {}
        for index, error in sorted(batch.unsendable.items()):
            self._post_send(batch.messages[index], None, DeliveryResult(error=str(error)))
        for job in batch.jobs.values():
            results.update(job.results)
            outcomes = {index: DeliveryResult(error=str(e)) for index, e in job.errors.items()}
            outcomes.update(job.results)
            for index, result in sorted(outcomes.items()):
                if index in job.errors:
                    errors[index] = job.errors[index]
                elif result.error or result.refused:
                    errors[index] = _result_error(index, job.mailbox, result)
                self._post_send(batch.messages[index], job.mailbox, result)
            delivered = sum(result.delivered for result in job.results.values())
            if delivered:
                self._record_sent(job.mailbox)
            sent += delivered
        if errors:
            self._raise(len(batch.messages), sent, errors, results)
        return sent

    @staticmethod
    def _post_send(message: EmailMessage, mailbox: Mailbox | None, result: DeliveryResult) -> None:
        signals.post_send.send(
            sender=EmailBackend,
            message=message,
            mailbox=mailbox,
            sent=result.delivered,
            error=result.error,
            refused_recipients=dict(result.refused),
            undetermined=result.undetermined,
        )

    @staticmethod
    def _record_sent(mailbox: Mailbox) -> None:
        now = timezone.now()
        if mailbox.last_sent_at and now - mailbox.last_sent_at < LAST_SENT_RESOLUTION:
            return
        mailbox.last_sent_at = now
        # After the caller's transaction, if it has one: an UPDATE inside it would
        # hold the Mailbox row (which token refreshes lock) until the caller commits.
        transaction.on_commit(
            lambda: Mailbox.objects.filter(pk=mailbox.pk).update(last_sent_at=now),
            using=router.db_for_write(Mailbox),
            robust=True,
        )

    def _raise(
        self,
        total: int,
        sent: int,
        errors: dict[int, Exception],
        results: dict[int, DeliveryResult],
    ) -> None:
        failures = [
            MessageFailure(
                index=index,
                error=str(error),
                refused_recipients=dict(results[index].refused) if index in results else {},
                undetermined=results[index].undetermined if index in results else False,
            )
            for index, error in sorted(errors.items())
        ]
        distinct = list({id(error): error for error in errors.values()}.values())
        if len(distinct) == 1 and (sent == 0 or isinstance(distinct[0], SendError)):
            # One cause and nothing delivered (e.g. the mailbox must be reconnected):
            # raise it as is; once something was delivered, SendError carries the count.
            error = distinct[0]
        else:
            error = SendError(
                f"{len(failures)} of {total} messages were not (fully) "
                f"delivered ({sent} were sent): "
                + "; ".join(f"#{f.index}: {f.error}" for f in failures[:5])
                + (" ..." if len(failures) > 5 else "")
            )
        if isinstance(error, SendError):
            error.sent = sent
            error.failures = failures
        if self.fail_silently:
            logger.error("Mail not delivered (fail_silently is set): %s", error)
            return
        raise error


def _result_error(index: int, mailbox: Mailbox, result: DeliveryResult) -> SendError:
    refused = ", ".join(
        f"{rcpt} ({code} {reply})" for rcpt, (code, reply) in result.refused.items()
    )
    if result.delivered:
        text = f"message #{index} was sent, but the server refused these recipients: {refused}"
    elif result.undetermined:
        text = (
            f"message #{index} may or may not have been delivered ({result.error}); it was "
            "not sent again, to avoid a duplicate"
        )
    else:
        text = f"message #{index} was not delivered from {mailbox.email}: {result.error}"
        if refused:
            text += f" (refused: {refused})"
    return SendError(text, mailbox=mailbox.email)


OPTIONS = ("mailbox", "timeout", "max_connections", "keep_alive", "rate_limit", "fail_silently")

# Idle seconds a kept-alive session survives when keep_alive=True.
DEFAULT_KEEP_ALIVE = 60.0


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"The backend option {name!r} must be a whole number of at least 1, not {value!r}."
        )
    return value


def _keep_alive_seconds(value: bool | float) -> float | None:
    if value is True:
        return DEFAULT_KEEP_ALIVE
    if value is False or value == 0:
        return None
    if isinstance(value, int | float) and value > 0:
        return float(value)
    raise ConfigurationError(
        f"The backend option 'keep_alive' must be True, False or idle seconds, not {value!r}."
    )


class TaskEmailBackend(EmailBackend):
    """Checks each message as ``EmailBackend`` does, stores it in the outbox and
    enqueues a task (Django's Tasks framework) that a worker runs to send it.

    ``send_messages()`` returns the number queued and never touches the
    network; a message that cannot be sent raises and nothing of the call is
    queued. Options: ``queue_name``, ``priority``, ``tasks_backend`` (an alias
    of ``settings.TASKS``) and ``mailbox``.
    """

    def __init__(
        self,
        fail_silently: bool = False,
        *,
        mailbox: str | None = None,
        queue_name: str = "default",
        priority: int = 0,
        tasks_backend: str = "default",
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> None:
        # Imported here, not at the top: the Tasks framework (django.tasks, or the
        # django-tasks backport on Django 5.2) is needed only by this backend.
        from django_xoauth2_mail import tasks

        sending_options = set(kwargs) & {"timeout", "max_connections", "keep_alive", "rate_limit"}
        if sending_options or (not BASE_TAKES_ALIAS and kwargs):
            names = ", ".join(repr(name) for name in sorted(sending_options or kwargs))
            raise ConfigurationError(
                f"django_xoauth2_mail.backends.TaskEmailBackend got unknown options {names}; "
                f"it accepts {', '.join(TASK_OPTIONS)}. (Its workers send with the "
                "provider's limits; timeouts come from XOAUTH2_MAIL['SMTP_TIMEOUT'].)"
            )
        super().__init__(
            fail_silently, mailbox=mailbox, username=username, password=password, **kwargs
        )
        self.queue = outbox.QueueOptions(
            tasks_backend=tasks_backend, queue_name=queue_name, priority=priority
        )
        self.tasks = tasks
        tasks.check_queue_options(self.queue)

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        messages = list(email_messages or [])
        if not messages:
            return 0
        return self._call_blocking(self._queue, messages)

    async def asend_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        return await sync_to_async(self.send_messages)(email_messages)

    def _queue(self, messages: Sequence[EmailMessage]) -> int:
        converted, unsendable = self._convert(messages)
        if unsendable and not self.fail_silently:
            # Checked here, in the caller, as a send would be: nothing of the call is queued.
            raise next(iter(unsendable.values()))
        items = []
        for index, (envelope, mailbox) in converted.items():
            signals.pre_send.send(sender=type(self), message=messages[index], mailbox=mailbox)
            headers = BytesHeaderParser(policy=email.policy.default).parsebytes(envelope.data)
            subject = str(headers.get("Subject", ""))
            items.append((envelope, mailbox, str(headers.get("Message-ID", "")), subject))
        rows = outbox.store(items, self.queue)
        self.tasks.enqueue_on_commit(rows)
        return len(rows)


TASK_OPTIONS = ("mailbox", "queue_name", "priority", "tasks_backend", "fail_silently")
