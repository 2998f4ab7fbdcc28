"""The process-wide event loop that owns every SMTP connection.

An aiosmtplib connection belongs to the event loop that opened it, and
``async_to_sync`` runs each call on a fresh loop (and refuses to run in a
thread whose loop is already running). So one daemon thread runs one loop for
the whole process; sync code submits coroutines to it and waits, async code
awaits them without blocking its own loop. A forked child (e.g. a
pre-forking web server) starts its own loop on first use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections

T = TypeVar("T")


class MailLoop:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    def _ensure_running(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid() or not self._loop.is_running():
                loop = asyncio.new_event_loop()
                started = threading.Event()
                thread = threading.Thread(
                    target=self._run, args=(loop, started), name="xoauth2-mail-loop", daemon=True
                )
                thread.start()
                started.wait()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        loop.run_forever()

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the mail loop and block until it is done."""
        if self.in_loop_thread():
            coroutine.close()
            raise RuntimeError(
                "send_messages() was called from the mail loop itself (e.g. from a signal "
                "receiver running there); use `await backend.asend_messages()` instead."
            )
        future = asyncio.run_coroutine_threadsafe(coroutine, self._ensure_running())
        return future.result()

    def run_if_started(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> None:
        """Run ``coroutine`` if this process's loop runs (at exit: never start one)."""
        loop = self._loop
        if loop is None or self._pid != os.getpid() or not loop.is_running():
            coroutine.close()
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    async def arun(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Await ``coroutine`` on the mail loop without blocking the caller's loop."""
        if self.in_loop_thread():
            return await coroutine
        future = asyncio.run_coroutine_threadsafe(coroutine, self._ensure_running())
        return await asyncio.wrap_future(future)


mail_loop = MailLoop()

# Django forbids the ORM in a thread whose event loop is running (an async
# view calling send_mail()); such calls are handed to this pool and awaited.
sync_worker = concurrent.futures.ThreadPoolExecutor(
    max_workers=4, thread_name_prefix="xoauth2-mail-sync"
)


def event_loop_running_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# ORM work needed while on the mail loop (a token refresh after the SMTP
# server refused a token, or for a reconnect) runs in this one thread. Not
# asgiref's thread-sensitive executor: the caller may be blocked in it,
# waiting for the mail loop, and the two would wait for each other forever.
_orm_executor = concurrent.futures.ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="xoauth2-mail-orm"
)


def _with_fresh_connections(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    close_old_connections()
    try:
        return function(*args, **kwargs)
    finally:
        close_old_connections()


async def run_orm(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    call = sync_to_async(_with_fresh_connections, thread_sensitive=False, executor=_orm_executor)
    return await call(function, *args, **kwargs)
