"""Messages-per-minute limits per mailbox, shared by every thread of a process.

All sending runs on the one mail loop, so an asyncio limiter per mailbox
covers the whole process. The window slides: at most ``per_minute``
messages start in any 60 seconds (Microsoft 365 counts that way).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Hashable
from typing import Protocol

WINDOW = 60.0


class Clock(Protocol):
    """Where a limiter reads the time and waits. Tests pass a virtual one."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class SlidingWindowLimiter:
    def __init__(self, per_minute: int, clock: Clock | None = None) -> None:
        self.per_minute = per_minute
        self.clock = clock or SystemClock()
        self._starts: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:  # first come, first served
            while True:
                now = self.clock.monotonic()
                while self._starts and now - self._starts[0] >= WINDOW:
                    self._starts.popleft()
                if len(self._starts) < self.per_minute:
                    self._starts.append(now)
                    return
                await self.clock.sleep(WINDOW - (now - self._starts[0]))

    def __repr__(self) -> str:
        return f"<SlidingWindowLimiter {self.per_minute}/min>"


_limiters: dict[tuple[Hashable, int], SlidingWindowLimiter] = {}
# A forked child has a new mail loop: the parent's limiters' asyncio locks belong to the old one.
os.register_at_fork(after_in_child=_limiters.clear)


def limiter_for(key: Hashable, per_minute: int) -> SlidingWindowLimiter:
    """The process's limiter for one mailbox (only ever called on the mail loop)."""
    limiter = _limiters.get((key, per_minute))
    if limiter is None:
        limiter = _limiters[(key, per_minute)] = SlidingWindowLimiter(per_minute)
    return limiter
