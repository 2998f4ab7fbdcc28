"""Kept-alive SMTP sessions, reused across send_messages() calls (opt-in).

The pool lives on the mail loop (sending/loop.py), so a session is never shared
between event loops, and threads never touch it directly. An idle session
is checked with NOOP before reuse only when it has idled long enough for a
server to have dropped it; otherwise a dead connection is noticed by the
next transaction, which reconnects before any message data is sent.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import time
from collections.abc import Callable, Hashable

import aiosmtplib

from django_xoauth2_mail.sending.limits import slots_wanted
from django_xoauth2_mail.sending.loop import mail_loop, start_background_task
from django_xoauth2_mail.sending.session import SMTPSession

# After this many idle seconds a session is checked with NOOP before reuse.
CHECK_AFTER_IDLE = 15.0
# How often idle sessions holding a shared session slot (MAX_SESSIONS) check whether
# another process waits for one: if so they close, giving their slots back.
DEMAND_POLL = 1.0


class SessionPool:
    def __init__(self) -> None:
        self.reset_after_fork()

    def reset_after_fork(self) -> None:
        # A child must not touch the parent's sessions (their loop is not running
        # here and their sockets are the parent's): forget them, say nothing.
        self._idle: dict[Hashable, list[tuple[SMTPSession, float, asyncio.TimerHandle]]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None

    async def acquire(self, key: Hashable, new_session: Callable[[], SMTPSession]) -> SMTPSession:
        idle = self._idle.get(key, [])
        while idle:
            session, since, expiry = idle.pop()
            expiry.cancel()
            if await _still_usable(session, time.monotonic() - since):
                return session
            await session.close()
        return new_session()

    def release(self, key: Hashable, session: SMTPSession, idle_timeout: float) -> None:
        if not session.is_open:
            return
        loop = asyncio.get_running_loop()
        expiry = loop.call_later(idle_timeout, self._expire, key, session)
        self._idle.setdefault(key, []).append((session, time.monotonic(), expiry))
        watch = self._watch
        stopped = watch is None or watch.done() or watch.get_loop() is not loop
        if session.lease is not None and stopped:
            self._watch = start_background_task(self._give_back_wanted_slots())

    async def _give_back_wanted_slots(self) -> None:
        while True:
            await asyncio.sleep(DEMAND_POLL)
            holding = {
                session.limits.mailbox_id: key
                for key, entries in self._idle.items()
                for session, _, _ in entries
                if session.lease is not None and session.limits is not None
            }
            if not holding:
                return
            for mailbox_id in await slots_wanted(set(holding)):
                key = holding[mailbox_id]
                entries = self._idle.get(key, [])
                self._idle[key] = [entry for entry in entries if entry[0].lease is None]
                for session, _, expiry in set(entries) - set(self._idle[key]):
                    expiry.cancel()
                    await session.close()

    def _expire(self, key: Hashable, session: SMTPSession) -> None:
        entries = self._idle.get(key, [])
        self._idle[key] = [entry for entry in entries if entry[0] is not session]
        # The loop keeps only a weak reference to a task: hold it until it is done. No
        # caller's: the send that released this session may be long over.
        task = start_background_task(session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close_all(self) -> None:
        entries = [entry for entries in self._idle.values() for entry in entries]
        self._idle.clear()
        for _, _, expiry in entries:
            expiry.cancel()
        await asyncio.gather(*(session.close() for session, _, _ in entries))

    def idle_count(self) -> int:
        return sum(len(entries) for entries in self._idle.values())


async def _still_usable(session: SMTPSession, idle_for: float) -> bool:
    if not session.is_open:
        return False
    if idle_for < CHECK_AFTER_IDLE or session.client is None:
        return True
    try:
        await session.client.noop()
    except (aiosmtplib.SMTPException, OSError):
        return False
    return True


pool = SessionPool()
os.register_at_fork(after_in_child=pool.reset_after_fork)


@atexit.register
def _close_pool_at_exit() -> None:
    # Say QUIT to the servers rather than leave them a dropped connection.
    mail_loop.run_if_started(pool.close_all(), timeout=5.0)
