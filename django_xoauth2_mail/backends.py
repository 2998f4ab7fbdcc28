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

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import django
from asgiref.sync import sync_to_async
from django.core.mail import EmailMessage
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.utils import DNS_NAME
from django.utils import timezone

from django_xoauth2_mail import signals, tokens
from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.exceptions import (
    ConfigurationError,
    MailboxNotFound,
    MessageFailure,
    SendError,
    XOAuth2MailError,
)
from django_xoauth2_mail.loop import event_loop_running_here, mail_loop, run_orm, sync_worker
from django_xoauth2_mail.messages import Envelope, build_envelope, sender_candidates
from django_xoauth2_mail.models import Mailbox, normalize_address
from django_xoauth2_mail.providers import get_provider
from django_xoauth2_mail.providers.base import SMTPEndpoint
from django_xoauth2_mail.smtp import DeliveryResult, SMTPSession

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Django 6.1's BaseEmailBackend takes ``alias`` and rejects unknown options itself.
BASE_TAKES_ALIAS = django.VERSION >= (6, 1)
# last_sent_at is bookkeeping, not a log: write it at most this often per mailbox.
LAST_SENT_RESOLUTION = dt.timedelta(seconds=60)


@dataclass
class _MailboxJob:
    mailbox: Mailbox
    endpoint: SMTPEndpoint
    items: list[tuple[int, Envelope]] = field(default_factory=list)


@dataclass
class _Batch:
    messages: Sequence[EmailMessage]
    jobs: dict[int, _MailboxJob] = field(default_factory=dict)
    results: dict[int, DeliveryResult] = field(default_factory=dict)
    errors: dict[int, Exception] = field(default_factory=dict)  # index -> why it failed


class EmailBackend(BaseEmailBackend):
    """Sends through the Mailbox that matches each message's sender, over
    SMTP authenticated with OAuth2 (XOAUTH2)."""

    def __init__(
        self,
        fail_silently: bool = False,
        *,
        mailbox: str | None = None,
        timeout: float | None = None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> None:
        if BASE_TAKES_ALIAS:
            # fail_silently is kept here, not passed up: Django 6.1 deprecates
            # it in the base class but send_mail() still hands it to backends.
            super().__init__(**kwargs)
        else:
            if kwargs:
                names = ", ".join(repr(name) for name in kwargs)
                raise ConfigurationError(
                    f"django_xoauth2_mail.backends.EmailBackend got unknown options {names}; "
                    "it accepts mailbox, timeout and fail_silently."
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
        self.timeout = float(timeout) if timeout is not None else conf.SMTP_TIMEOUT
        self._opened = False
        self._sessions: dict[int, SMTPSession] = {}  # only touched on the mail loop

    # Django's connection API ------------------------------------------------

    def open(self) -> bool:
        """Keep SMTP sessions open across send_messages() calls until close()."""
        if self._opened:
            return False
        self._opened = True
        return True

    def close(self) -> None:
        self._opened = False
        if self._sessions:
            self._call_blocking(mail_loop.run, self._close_sessions())

    async def _close_sessions(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(session.close() for session in sessions))

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
        await mail_loop.arun(self._transmit(batch))
        return await sync_to_async(self._finish)(batch)

    @staticmethod
    def _call_blocking(function: Callable[..., T], *args: Any) -> T:
        if event_loop_running_here():
            # An async view called send_mail(): Django forbids the ORM in this
            # thread, so do the (blocking, by contract) work in a worker thread.
            return sync_worker.submit(function, *args).result()
        return function(*args)

    def _send_blocking(self, messages: Sequence[EmailMessage]) -> int:
        batch = self._prepare(messages)
        mail_loop.run(self._transmit(batch))
        return self._finish(batch)

    # Phase 1: prepare (caller's thread) ------------------------------------

    def _prepare(self, messages: Sequence[EmailMessage]) -> _Batch:
        batch = _Batch(messages)
        envelopes = {
            index: build_envelope(message, index)
            for index, message in enumerate(messages)
            if message.recipients()  # like Django: a message without recipients is skipped
        }
        mailboxes = self._pick_mailboxes({i: messages[i] for i in envelopes})
        for index, envelope in envelopes.items():
            mailbox = mailboxes[index]
            job = batch.jobs.get(mailbox.pk)
            if job is None:
                job = batch.jobs[mailbox.pk] = _MailboxJob(
                    mailbox, get_provider(mailbox.provider).smtp_endpoint
                )
            job.items.append((index, envelope))
        for job in batch.jobs.values():
            self._get_ready(batch, job)
        return batch

    def _pick_mailboxes(self, messages: dict[int, EmailMessage]) -> dict[int, Mailbox]:
        candidates = {index: list(sender_candidates(m)) for index, m in messages.items()}
        fallbacks = [normalize_address(a) for a in (self.mailbox, conf.DEFAULT_MAILBOX) if a]
        wanted = {address for addresses in candidates.values() for address in addresses}
        known = {mb.email: mb for mb in Mailbox.objects.filter(email__in=wanted | set(fallbacks))}
        chosen = {}
        for index, addresses in candidates.items():
            for address in [*addresses, *fallbacks]:
                if address in known:
                    chosen[index] = known[address]
                    break
            else:
                raise MailboxNotFound(
                    f"No mailbox can send message #{index} from "
                    f"{messages[index].from_email!r}: no Mailbox has that address"
                    + (f" nor the fallback {', '.join(fallbacks)}" if fallbacks else "")
                    + ". Connect one with `python manage.py connect_mailbox <provider>`, or name "
                    "an existing one in the backend's 'mailbox' option or "
                    "XOAUTH2_MAIL['DEFAULT_MAILBOX']. Nothing was sent from this call.",
                    mailbox=addresses[0] if addresses else None,
                )
        return chosen

    def _get_ready(self, batch: _Batch, job: _MailboxJob) -> None:
        try:
            tokens.get_access_token(job.mailbox)
        except XOAuth2MailError as exc:
            if isinstance(exc, ConfigurationError):
                raise
            for index, _ in job.items:
                batch.errors[index] = exc
            job.items = []
            return
        for index, _ in job.items:
            signals.pre_send.send(
                sender=type(self), message=batch.messages[index], mailbox=job.mailbox
            )

    # Phase 2: transmit (mail loop) -------------------------------------------

    async def _transmit(self, batch: _Batch) -> None:
        await asyncio.gather(*(self._transmit_job(batch, job) for job in batch.jobs.values()))

    async def _transmit_job(self, batch: _Batch, job: _MailboxJob) -> None:
        if not job.items:
            return
        session = self._sessions.get(job.mailbox.pk)
        if session is None or session.endpoint != job.endpoint:
            session = self._new_session(job)
            if self._opened:
                self._sessions[job.mailbox.pk] = session
        try:
            for position, (index, envelope) in enumerate(job.items):
                try:
                    batch.results[index] = await session.send(envelope)
                except SendError as exc:  # cannot connect or authenticate: the rest fail too
                    for rest_index, _ in job.items[position:]:
                        batch.errors[rest_index] = exc
                    break
        finally:
            if not self._opened:
                await session.close()

    def _new_session(self, job: _MailboxJob) -> SMTPSession:
        mailbox_pk = job.mailbox.pk
        mailbox = job.mailbox

        async def token_source(rejected: str | None) -> str:
            if rejected is None and mailbox.access_token_is_fresh(conf.TOKEN_REFRESH_SKEW):
                return mailbox.access_token  # type: ignore[return-value]
            fresh = await run_orm(Mailbox.objects.get, pk=mailbox_pk)
            return await run_orm(tokens.get_access_token, fresh, rejected_token=rejected)

        return SMTPSession(
            job.endpoint,
            mailbox.email,
            token_source,
            timeout=self.timeout,
            local_hostname=DNS_NAME.get_fqdn(),
            allow_insecure=conf.ALLOW_INSECURE_SMTP,
        )

    # Phase 3: finish (caller's thread) ----------------------------------------

    def _finish(self, batch: _Batch) -> int:
        sent = 0
        for job in batch.jobs.values():
            delivered_here = 0
            for index, _ in job.items:
                result = batch.results.get(index)
                if result is None:
                    continue
                if result.delivered:
                    delivered_here += 1
                if result.error or result.refused:
                    batch.errors.setdefault(index, _result_error(index, job.mailbox, result))
                self._post_send(batch.messages[index], job.mailbox, result)
            sent += delivered_here
            if delivered_here:
                self._record_sent(job.mailbox)
        if batch.errors:
            self._raise(batch, sent)
        return sent

    @staticmethod
    def _post_send(message: EmailMessage, mailbox: Mailbox, result: DeliveryResult) -> None:
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
        Mailbox.objects.filter(pk=mailbox.pk).update(last_sent_at=now)
        mailbox.last_sent_at = now

    def _raise(self, batch: _Batch, sent: int) -> None:
        failures = [
            MessageFailure(
                index=index,
                error=str(error),
                refused_recipients=dict(getattr(batch.results.get(index), "refused", {})),
                undetermined=getattr(batch.results.get(index), "undetermined", False),
            )
            for index, error in sorted(batch.errors.items())
        ]
        distinct = list({id(error): error for error in batch.errors.values()}.values())
        if len(distinct) == 1:
            # One cause (e.g. the mailbox must be reconnected): raise it as is.
            error = distinct[0]
        else:
            error = SendError(
                f"{len(failures)} of {len(batch.messages)} messages were not (fully) "
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
