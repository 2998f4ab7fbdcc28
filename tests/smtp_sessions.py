"""Counts the authenticated sessions open at the test SMTP server, per user: what
MAX_SESSIONS limits, measured where it matters (the server), whatever sends."""

from __future__ import annotations

import collections
import threading
from typing import Any

from django_xoauth2_mail.devserver import smtp as devserver_smtp


class SessionCounter:
    """Authenticated sessions open at the server, per user, and the most seen at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: collections.Counter[str] = collections.Counter()
        self.peak: collections.Counter[str] = collections.Counter()

    def opened(self, user: str) -> None:
        with self.lock:
            self.open[user] += 1
            self.peak[user] = max(self.peak[user], self.open[user])

    def closed(self, user: str) -> None:
        with self.lock:
            self.open[user] -= 1


def counting_protocol(counter: SessionCounter) -> type[Any]:
    """The server's protocol, reporting each authenticated session to ``counter``
    (monkeypatch it over ``devserver_smtp._XOAuth2Protocol`` before starting the server)."""

    class CountingProtocol(devserver_smtp._XOAuth2Protocol):
        counted_user: str | None = None

        async def auth_XOAUTH2(self, server: Any, args: list[str]) -> Any:
            result = await super().auth_XOAUTH2(server, args)
            if result.success:
                self.counted_user = str(result.auth_data)
                counter.opened(self.counted_user)
            return result

        def connection_lost(self, exc: Exception | None) -> None:
            if self.counted_user is not None:
                counter.closed(self.counted_user)
                self.counted_user = None
            super().connection_lost(exc)

    return CountingProtocol
