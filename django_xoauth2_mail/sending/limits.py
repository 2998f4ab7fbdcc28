"""Per-mailbox limits shared by every process and machine that uses the database.

``MAX_SESSIONS``: a session takes a slot (a ``SendingLease`` row) before it
connects and gives it back when it closes. While it lives, its process renews
it (one UPDATE for all its slots every ``SESSION_LEASE`` / 3 seconds); a process
that dies stops renewing, and its slots free themselves ``SESSION_LEASE`` seconds
later. A session whose slot could not be renewed in time stops and takes a new one.

``RATE_LIMIT`` = N: a mailbox has N send permits. A message takes a permit whose
previous message ended ``WINDOW`` seconds ago or more, and when the server has
answered its end of data the permit is set to free ``WINDOW`` seconds later.
Two messages that used the same permit therefore reached the server at least
``WINDOW`` apart, so no ``WINDOW`` ever sees more than N of them (pigeonhole).
Why permits rather than a row per message that is counted: N fixed rows need no
pruning, and a conditional UPDATE settles a race, where counting rows needs a
per-mailbox lock to stop two processes from both seeing room for one more.

Waiting is bounded by ``LIMIT_WAIT`` and ends in :class:`SendingLimitReached`.
Within a process the waiters of one mailbox queue on an asyncio lock (first come,
first served), so only one of them polls the database; the database work runs in
a small thread pool of its own, never on the mail loop.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import os
import random
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from django.db import Error as DatabaseError
from django.db import ProgrammingError, close_old_connections, connections, router

from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.exceptions import SendError, SendingLimitReached
from django_xoauth2_mail.models import SendingLease
from django_xoauth2_mail.providers import get_provider
from django_xoauth2_mail.sending import leases
from django_xoauth2_mail.sending.loop import run_orm, start_background_task

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Seconds of the rate window (providers count per minute). Only tests change it.
WINDOW = 60.0
# Seconds a send may keep its permit before the end of data; a process that dies
# mid-send leaves the permit taken this long (plus WINDOW), never less.
SEND_HOLD = 600.0
# Longest pause between two polls of the database while waiting.
MAX_POLL = 2.0
# A process waiting for a session slot says so for this long, again while it waits;
# processes holding an idle kept-alive session of that mailbox then close it.
DEMAND_TTL = 5.0
SESSION, SEND = SendingLease.Kind.SESSION.value, SendingLease.Kind.SEND.value

_HOST = socket.gethostname()[:24]
_serial = itertools.count()


def _new_holder() -> str:
    """Names one lease: no other lease, of this process or another, gets the same."""
    return f"{_HOST}:{os.getpid()}:{next(_serial)}:{os.urandom(4).hex()}"


@dataclass(eq=False)
class SessionLease:
    limits: MailboxLimits
    number: int
    holder: str
    valid_until: float  # time.monotonic(): before it, no other process can hold this slot
    lost: bool = False

    @property
    def usable(self) -> bool:
        return not self.lost and time.monotonic() < self.valid_until

    async def release(self) -> None:
        try:
            await _db(leases.release, self.limits.mailbox_id, SESSION, self.number, self.holder)
        except RuntimeError:  # at exit, the thread pool takes no more work
            _renewer().at_exit.append(self)  # given back by _give_back_at_exit
            return
        except DatabaseError as exc:
            logger.warning(
                "Could not give back a session slot of %s (%s); it frees itself within %g s",
                self.limits.email,
                exc,
                conf.SESSION_LEASE,
            )
        _renewer().discard(self)
        self.limits.slot_freed.set()


@dataclass(eq=False)
class SendPermit:
    limits: MailboxLimits
    number: int
    holder: str

    async def done(self) -> None:
        """The message reached the end of data (or never will): count WINDOW from now."""
        try:
            await _db(leases.extend, self.limits.mailbox_id, SEND, self.number, self.holder, WINDOW)
        except DatabaseError as exc:
            logger.warning(
                "Could not record a send of %s (%s); its permit frees %g s later than needed",
                self.limits.email,
                exc,
                SEND_HOLD,
            )


@dataclass(eq=False)
class MailboxLimits:
    """One mailbox's shared limits, as seen from this process's mail loop."""

    mailbox_id: int
    email: str
    rate_limit: int | None
    max_sessions: int | None
    slot_freed: asyncio.Event = field(default_factory=asyncio.Event)
    _slots: asyncio.Lock = field(default_factory=asyncio.Lock)
    _permits: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def take_session(self, wait: float | None) -> SessionLease | None:
        """A session slot (None without MAX_SESSIONS). ``wait=None``: one try, and None
        when every slot is taken; otherwise wait up to ``wait`` seconds, then raise."""
        if not self.max_sessions:
            return None
        if wait is None and self._slots.locked():
            return None  # others of this process already wait for a slot
        budget = 0.0 if wait is None else wait
        deadline = time.monotonic() + budget
        holder, lease_seconds = _new_holder(), conf.SESSION_LEASE
        if not await _acquire(self._slots, deadline):
            raise self._sessions_full(budget)
        try:
            pause, said_at = 0.05, -DEMAND_TTL
            while True:
                started = time.monotonic()
                args = (SESSION, self.max_sessions, holder, lease_seconds)
                number, _ = await self._try(deadline, *args)
                if number is not None:
                    lease = SessionLease(self, number, holder, started + lease_seconds * 5 / 6)
                    _renewer().add(lease)
                    return lease
                if wait is None:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._sessions_full(budget)
                logger.debug("%s waits for a session slot (MAX_SESSIONS)", self.email)
                if time.monotonic() - said_at > DEMAND_TTL / 2:
                    said_at = time.monotonic()
                    await self._say_wanted()
                await self._slot_freed_or(min(pause * random.uniform(1.0, 1.5), remaining))
                pause = min(pause * 2, MAX_POLL)
        finally:
            self._slots.release()

    async def _say_wanted(self) -> None:
        try:
            await _db(leases.want, self.mailbox_id, DEMAND_TTL)
        except DatabaseError as exc:  # only idle sessions elsewhere closing later
            logger.info("Could not ask for a session slot of %s: %s", self.email, exc)

    async def _slot_freed_or(self, timeout: float) -> None:
        """Sleep ``timeout``, or less when this process gives back a slot (others'
        slots are seen by polling)."""
        self.slot_freed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.slot_freed.wait(), timeout)

    async def take_permit(self, wait: float) -> SendPermit | None:
        """A send permit (None without RATE_LIMIT), waiting up to ``wait`` seconds."""
        if not self.rate_limit:
            return None
        deadline = time.monotonic() + wait
        holder = _new_holder()
        if not await _acquire(self._permits, deadline):
            raise self._rate_full(wait, None)
        try:
            while True:
                args = (SEND, self.rate_limit, holder, WINDOW + SEND_HOLD)
                number, retry_in = await self._try(deadline, *args)
                if number is not None:
                    return SendPermit(self, number, holder)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._rate_full(wait, retry_in)
                pause = min(max(retry_in, 0.01) + random.uniform(0, 0.02), remaining, MAX_POLL)
                logger.debug("%s waits %.2f s for room under RATE_LIMIT", self.email, pause)
                await asyncio.sleep(pause)
        finally:
            self._permits.release()

    async def _try(self, deadline: float, *args: Any) -> tuple[int | None, float]:
        try:
            attempt = await _db(leases.try_take, self.mailbox_id, *args)
        except DatabaseError as exc:
            if isinstance(exc, ProgrammingError) or "no such table" in str(exc):
                raise SendError(
                    f"The shared sending limits of {self.email} could not be read ({exc}). "
                    "Run `python manage.py migrate django_xoauth2_mail`.",
                    mailbox=self.email,
                ) from None
            if time.monotonic() >= deadline:
                raise SendingLimitReached(
                    f"The shared sending limits of {self.email} could not be checked: the "
                    f"database answered {exc}. Nothing more was sent; try again later. On "
                    "SQLite, do not send from inside a transaction that has written (use "
                    "transaction.on_commit): other connections cannot write until it ends.",
                    mailbox=self.email,
                ) from None
            logger.info("Sending limits of %s: the database said %s; retrying", self.email, exc)
            return None, 0.2
        return attempt.number, attempt.retry_in

    def _sessions_full(self, wait: float) -> SendingLimitReached:
        return SendingLimitReached(
            f"{self.email} already has {self.max_sessions} SMTP sessions open (its provider's "
            f"MAX_SESSIONS, counted across every process using this database), and none "
            f"closed within {wait:g} s. Nothing more was sent from this call; try again "
            "later, or send from fewer processes at once (lower max_connections, shorter "
            "keep_alive), or raise XOAUTH2_MAIL['LIMIT_WAIT'].",
            mailbox=self.email,
        )

    def _rate_full(self, wait: float, retry_in: float | None) -> SendingLimitReached:
        return SendingLimitReached(
            f"{self.email} already sent {self.rate_limit} messages in the last {WINDOW:g} s "
            f"(its provider's RATE_LIMIT, counted across every process using this "
            f"database), and no room freed within {wait:g} s. Nothing more was sent from "
            "this call; try again later, or raise XOAUTH2_MAIL['LIMIT_WAIT'].",
            mailbox=self.email,
            retry_after=retry_in,
        )


async def _acquire(lock: asyncio.Lock, deadline: float) -> bool:
    if not lock.locked():
        return await lock.acquire()  # at once (wait_for with no time left would not try)
    try:
        await asyncio.wait_for(lock.acquire(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        return False
    return True


class _Renewer:
    """Renews this process's session slots while their sessions live. Weak references:
    a session dropped without close() stops being renewed, and its slot expires."""

    def __init__(self) -> None:
        self._leases: weakref.WeakSet[SessionLease] = weakref.WeakSet()
        self._task: asyncio.Task[None] | None = None
        self._period = 0.0
        self.at_exit: list[SessionLease] = []

    def add(self, lease: SessionLease) -> None:
        self._leases.add(lease)
        if self._task is not None and self._period > conf.SESSION_LEASE / 3:
            self._task.cancel()  # SESSION_LEASE was shortened: renew at the new pace
            self._task = None
        if self._task is None or self._task.done():
            self._task = start_background_task(self._run())

    def discard(self, lease: SessionLease) -> None:
        self._leases.discard(lease)

    async def _run(self) -> None:
        while self._leases:
            seconds = conf.SESSION_LEASE
            self._period = seconds / 3
            await asyncio.sleep(self._period)
            held = list(self._leases)
            if not held:
                return
            started = time.monotonic()
            pairs = [(lease.limits.mailbox_id, lease.holder) for lease in held]
            try:
                kept = await _db(leases.renew, pairs, seconds)
            except Exception as exc:  # keep renewing; sessions whose slot lapses stop
                logger.warning("Could not renew %d session slot(s): %s", len(held), exc)
                continue
            for lease in held:
                if lease.holder in kept:
                    lease.valid_until = started + seconds * 5 / 6
                else:  # expired and maybe taken: its session must stop and take another
                    lease.lost = True
                    self._leases.discard(lease)

    def give_back_all(self) -> None:
        """At exit, in the main thread: the sessions are closed (or about to die with
        the process), so their slots need not wait SESSION_LEASE to free."""
        for lease in [*self.at_exit, *self._leases]:
            args = (lease.limits.mailbox_id, SESSION, lease.number, lease.holder)
            try:
                _with_fresh_connection(leases.release, *args)
            except Exception as exc:  # they expire on their own
                logger.info("Could not give back a session slot at exit: %s", exc)
                return


# Per process: a forked child has its own loop, threads and leases.
_renewers: dict[int, _Renewer] = {}
_executors: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_registry: dict[tuple[int, int, int | None, int | None], MailboxLimits] = {}


def _renewer() -> _Renewer:
    return _renewers.setdefault(os.getpid(), _Renewer())


@atexit.register
def _give_back_at_exit() -> None:
    # Registered before the pool's own exit handler (pool.py imports this module),
    # so it runs after the pool said QUIT to its sessions.
    renewer = _renewers.get(os.getpid())
    if renewer is not None:
        renewer.give_back_all()


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    pid = os.getpid()
    if pid not in _executors:
        _executors[pid] = concurrent.futures.ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="xoauth2-mail-limits"
        )
    return _executors[pid]


def _with_fresh_connection(function: Callable[..., T], *args: Any) -> T:
    close_old_connections()
    try:
        return function(*args)
    finally:
        close_old_connections()


async def _db(function: Callable[..., T], *args: Any) -> T:
    """Run ``function`` where limit rows are written: on PostgreSQL (and other servers)
    in a thread on a connection of its own, in autocommit; on SQLite on the caller's.

    A connection of its own where it can be: limit rows are shared state, which other
    processes must see at once and which must not roll back with the caller's
    transaction. This cannot deadlock: the caller's transaction never locks a
    SendingLease row, and the table has no foreign-key constraint that would make an
    insert wait for the Mailbox row. SQLite has one writer at a time: a caller inside a
    transaction that has written holds that lock, and another connection would wait for
    it until SQLite's timeout. There the rows are written on the caller's connection
    (through ``run_orm``), in its transaction if it has one; no other process could
    write meanwhile anyway.
    """
    if _one_writer_at_a_time():
        return await run_orm(function, *args)
    call = functools.partial(_with_fresh_connection, function, *args)
    return await asyncio.get_running_loop().run_in_executor(_executor(), call)


def _one_writer_at_a_time() -> bool:
    alias = router.db_for_write(SendingLease)
    return "sqlite" in str(connections.settings[alias]["ENGINE"])


def limits_for(mailbox_id: int, email: str, provider_id: str) -> MailboxLimits | None:
    """The mailbox's shared limits from its provider's settings; None when it has none.
    Call on the mail loop only."""
    provider = get_provider(provider_id)
    rate_limit, max_sessions = provider.rate_limit, provider.max_sessions
    if not rate_limit and not max_sessions:
        return None
    key = (os.getpid(), mailbox_id, rate_limit, max_sessions)
    if key not in _registry:
        _registry[key] = MailboxLimits(mailbox_id, email, rate_limit, max_sessions)
    return _registry[key]


async def slots_wanted(mailbox_ids: set[int]) -> set[int]:
    """Which of these mailboxes some process waits a session slot for (for the pool:
    its idle sessions of those mailboxes close and give their slots back)."""
    try:
        return await _db(leases.wanted, mailbox_ids)
    except DatabaseError as exc:
        logger.info("Could not check who waits for session slots: %s", exc)
        return set()
