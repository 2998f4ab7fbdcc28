"""Virtual clocks: time that passes only when the code under test sleeps.

For tests of the package's own timing (rate limits, polling intervals): they run at once,
and assert the exact waits instead of measuring real ones.
"""

from __future__ import annotations


class VirtualClock:
    """``monotonic()`` and a ``sleep()`` that moves the time on without waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []  # every wait asked for, in order

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class AsyncVirtualClock:
    """The same for asyncio code: ``await clock.sleep(seconds)``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
