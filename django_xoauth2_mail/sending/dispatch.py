"""The mail-loop side of a send: SMTP sessions per mailbox, where they come
from (held by an open backend, kept alive in the process pool, or fresh),
and how one mailbox's messages are spread over up to ``max_connections``
of them. Everything here runs on the mail loop (sending/loop.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

from django.core.mail.utils import DNS_NAME
from django.views.decorators.debug import sensitive_variables

from django_xoauth2_mail import tokens
from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.exceptions import SendError
from django_xoauth2_mail.models import Mailbox
from django_xoauth2_mail.providers.base import SMTPEndpoint
from django_xoauth2_mail.sending.loop import run_orm
from django_xoauth2_mail.sending.messages import Envelope
from django_xoauth2_mail.sending.pool import pool
from django_xoauth2_mail.sending.ratelimit import limiter_for
from django_xoauth2_mail.sending.session import DeliveryResult, SMTPSession


@dataclass(frozen=True)
class SendOptions:
    timeout: float
    max_connections: int = 1
    keep_alive: float | None = None  # idle seconds a pooled session is kept
    retry_delays: tuple[float, ...] = ()


@dataclass
class MailboxJob:
    """One mailbox's share of a send_messages() call, and what became of it."""

    mailbox: Mailbox
    endpoint: SMTPEndpoint
    rate_limit: int | None = None
    max_sessions: int | None = None  # the provider's cap on concurrent sessions
    items: list[tuple[int, Envelope]] = field(default_factory=list)
    results: dict[int, DeliveryResult] = field(default_factory=dict)
    errors: dict[int, Exception] = field(default_factory=dict)
    # The outbox's check-in just before a message's data goes out (by index):
    # it records the point after which a resend could duplicate the message.
    before_end_of_data: Callable[[int], Awaitable[bool]] | None = None

    @property
    def key(self) -> Hashable:
        return (self.mailbox.pk, self.mailbox.email, self.endpoint)


class Dispatcher:
    """Runs jobs; holds sessions between calls while its backend is open."""

    def __init__(self, options: SendOptions) -> None:
        self.options = options
        self.holding = False
        self._held: dict[Hashable, list[SMTPSession]] = {}

    @property
    def holds_sessions(self) -> bool:
        return any(self._held.values())

    async def run(self, jobs: list[MailboxJob]) -> None:
        await asyncio.gather(*(self._run_job(job) for job in jobs if job.items))

    async def close(self) -> None:
        held = [session for sessions in self._held.values() for session in sessions]
        self._held.clear()
        await asyncio.gather(*(session.close() for session in held))

    async def _run_job(self, job: MailboxJob) -> None:
        cap = job.max_sessions or self.options.max_connections
        wanted = max(1, min(self.options.max_connections, cap, len(job.items)))
        queue = list(reversed(job.items))  # popped from the end: original order
        first = await self._acquire(job)
        sessions = [first]
        try:
            # The first session proves the token and the server before the
            # others open, so a refused token fails once, not N times.
            await self._work(job, first, queue, stop_after_one=wanted > 1)
            if queue and wanted > 1:
                sessions += [await self._acquire(job) for _ in range(wanted - 1)]
            await asyncio.gather(*(self._work(job, session, queue) for session in sessions))
        finally:
            await self._release(job, sessions)

    async def _work(
        self,
        job: MailboxJob,
        session: SMTPSession,
        queue: list[tuple[int, Envelope]],
        stop_after_one: bool = False,
    ) -> None:
        while queue:
            index, envelope = queue.pop()
            try:
                job.results[index] = await session.send(envelope, _check_in(job, index))
            except SendError as exc:  # cannot connect or authenticate
                job.errors[index] = exc
                if not session.is_open:
                    # What this session could not send, no other one will.
                    while queue:
                        job.errors[queue.pop()[0]] = exc
                    return
            if stop_after_one:
                return

    async def _acquire(self, job: MailboxJob) -> SMTPSession:
        held = self._held.get(job.key)
        if held:
            return held.pop()
        if self.options.keep_alive:
            return await pool.acquire(job.key, lambda: self._new_session(job))
        return self._new_session(job)

    async def _release(self, job: MailboxJob, sessions: list[SMTPSession]) -> None:
        if self.holding:
            self._held.setdefault(job.key, []).extend(sessions)
        elif self.options.keep_alive:
            for session in sessions:
                pool.release(job.key, session, self.options.keep_alive)
        else:
            await asyncio.gather(*(session.close() for session in sessions))

    def _new_session(self, job: MailboxJob) -> SMTPSession:
        mailbox_pk, email = job.mailbox.pk, job.mailbox.email
        state = {"mailbox": job.mailbox}

        @sensitive_variables()
        async def token_source(rejected: str | None) -> str:
            mailbox = state["mailbox"]
            if rejected is None and mailbox.access_token_is_fresh(conf.TOKEN_REFRESH_SKEW):
                return mailbox.access_token  # type: ignore[return-value]
            # A refused token, or a reconnect after the cached one expired.
            mailbox = state["mailbox"] = await run_orm(Mailbox.objects.get, pk=mailbox_pk)
            return await run_orm(tokens.get_access_token, mailbox, rejected_token=rejected)

        return SMTPSession(
            job.endpoint,
            email,
            token_source,
            timeout=self.options.timeout,
            local_hostname=DNS_NAME.get_fqdn(),
            allow_insecure=conf.ALLOW_INSECURE_SMTP,
            retry_delays=self.options.retry_delays,
            limiter=limiter_for(mailbox_pk, job.rate_limit) if job.rate_limit else None,
        )


def _check_in(job: MailboxJob, index: int) -> Callable[[], Awaitable[bool]] | None:
    hook = job.before_end_of_data
    if hook is None:
        return None

    async def before_end_of_data() -> bool:
        return await hook(index)

    return before_end_of_data
