"""The mail-loop side of a send: SMTP sessions per mailbox, where they come
from (held by an open backend, kept alive in the process pool, or fresh),
and how one mailbox's messages are spread over up to ``max_connections``
of them. Everything here runs on the mail loop (sending/loop.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

from django.core.mail.utils import DNS_NAME
from django.views.decorators.debug import sensitive_variables

from django_xoauth2_mail import tokens
from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.exceptions import SendError, SendingLimitReached
from django_xoauth2_mail.models import Mailbox
from django_xoauth2_mail.providers.base import SMTPEndpoint
from django_xoauth2_mail.sending.limits import limits_for
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
    # Seconds a message waits for the mailbox's shared limits (None: LIMIT_WAIT).
    limit_wait: float | None = None


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
        self._pid = os.getpid()

    @property
    def holds_sessions(self) -> bool:
        self._forget_if_forked()
        return any(self._held.values())

    def _forget_if_forked(self) -> None:
        # Sessions held before a fork() belong to the parent's loop and sockets:
        # a child must neither use them nor say QUIT on the parent's connections.
        if self._pid != os.getpid():
            self._held, self._pid = {}, os.getpid()

    @property
    def sasl_mechanisms(self) -> set[str]:
        """The SASL mechanisms the held sessions logged in with (for reports)."""
        sessions = (session for held in self._held.values() for session in held)
        return {session.sasl_mechanism for session in sessions if session.sasl_mechanism}

    async def run(self, jobs: list[MailboxJob]) -> None:
        """Run every job; never raises for a job's failure (each job records its own)."""
        await asyncio.gather(*(self._run_job_recording(job) for job in jobs if job.items))

    async def _run_job_recording(self, job: MailboxJob) -> None:
        try:
            await self._run_job(job)
        except Exception as exc:  # unforeseen: still fail only what was not done
            for index, _ in job.items:
                if index not in job.results:
                    job.errors.setdefault(index, exc)

    async def close(self) -> None:
        held = [session for sessions in self._held.values() for session in sessions]
        self._held.clear()
        await asyncio.gather(*(session.close() for session in held))

    async def _run_job(self, job: MailboxJob) -> None:
        limits = limits_for(job.mailbox.pk, job.mailbox.email, job.mailbox.provider)
        shared_cap = limits.max_sessions if limits is not None else None
        cap = shared_cap or job.max_sessions or self.options.max_connections
        wanted = max(1, min(self.options.max_connections, cap, len(job.items)))
        queue = list(reversed(job.items))  # popped from the end: original order
        first = await self._acquire(job)
        sessions = [first]
        try:
            # The first session proves the token and the server before the
            # others open, so a refused token fails once, not N times.
            await self._work(job, first, queue, stop_after_one=wanted > 1)
            while queue and len(sessions) < wanted:
                # Extra sessions only while the mailbox's shared MAX_SESSIONS has room.
                extra = await self._acquire(job)
                if not await extra.reserve():
                    break
                sessions.append(extra)
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
                result = await session.send(envelope, _check_in(job, index))
                job.results[index] = result
                if result.stalled:
                    # Every further wait for this server would likely run out too:
                    # keep the call within its documented duration (docs/backend.rst).
                    self._skip_after_stall(job, session, queue)
                    return
            except Exception as exc:  # e.g. cannot connect, authenticate or get a token
                job.errors[index] = exc
                if not session.is_open or isinstance(exc, SendingLimitReached):
                    # What this session could not send, no other one will.
                    while queue:
                        job.errors[queue.pop()[0]] = exc
                    return
            if stop_after_one:
                return

    @staticmethod
    def _skip_after_stall(
        job: MailboxJob, session: SMTPSession, queue: list[tuple[int, Envelope]]
    ) -> None:
        endpoint = session.endpoint
        error = SendError(
            f"not sent: the SMTP server {endpoint.host}:{endpoint.port} stopped answering "
            f"{job.mailbox.email}'s session earlier in this call (no reply within "
            f"{session.timeout:g} s), so it was not tried again within the call. Send these "
            "messages again later.",
            mailbox=job.mailbox.email,
        )
        while queue:
            job.errors[queue.pop()[0]] = error

    async def _acquire(self, job: MailboxJob) -> SMTPSession:
        self._forget_if_forked()
        held = self._held.get(job.key)
        if held:
            session = held.pop()
        elif self.options.keep_alive:
            session = await pool.acquire(job.key, lambda: self._new_session(job))
        else:
            return self._new_session(job)
        # An open one idled since an earlier call (a new one is not open yet).
        session.kept_from_earlier = True
        return session

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
        wait = self.options.limit_wait
        limits = limits_for(mailbox_pk, email, job.mailbox.provider)
        # This process's own limiter only for a backend rate_limit that differs from
        # the provider's RATE_LIMIT, which the shared limits already hold.
        local_rate = job.rate_limit
        if limits is not None and local_rate == limits.rate_limit:
            local_rate = None
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
            limiter=limiter_for(mailbox_pk, local_rate) if local_rate else None,
            limits=limits,
            limit_wait=conf.LIMIT_WAIT if wait is None else wait,
        )


def _check_in(job: MailboxJob, index: int) -> Callable[[], Awaitable[bool]] | None:
    hook = job.before_end_of_data
    if hook is None:
        return None

    async def before_end_of_data() -> bool:
        return await hook(index)

    return before_end_of_data
