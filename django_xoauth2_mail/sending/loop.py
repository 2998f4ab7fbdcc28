"""The process-wide event loop that owns every SMTP connection, and how the
code waiting for it does the database work a send needs.

An aiosmtplib connection belongs to the event loop that opened it, and
``async_to_sync`` runs each call on a fresh loop (and refuses to run in a
thread whose loop is already running). So one daemon thread runs one loop for
the whole process; sync code submits coroutines to it and waits, async code
awaits them without blocking its own loop.

ORM work needed while a send is on the mail loop (a token refresh after the
server refused a token) is sent back to the caller that waits for the send,
and runs there: in the caller's thread, on the caller's database connection,
inside the caller's transaction if it has one. A second connection would
wait for row locks (PostgreSQL) or the write lock (SQLite) that the caller's
own transaction may hold, while the caller waits for the send: a deadlock.

Everything here is per process: a forked child (a pre-forking server, a
``multiprocessing`` pool) starts with fresh state (``os.register_at_fork``),
never with the parent's loop, threads or locks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import os
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections

T = TypeVar("T")
# One ORM request from the mail loop: a function, its arguments, and the future
# (on the mail loop) that gets its result.
_Request = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]
_DONE = object()  # put in a caller's inbox when its send finished


class Caller:
    """The code that waits for one coroutine on the mail loop, as seen from there.

    ``call()`` (on the mail loop) hands a function to the caller, which runs it
    between its waits and sends the result back.
    """

    def __init__(self, mail_loop: asyncio.AbstractEventLoop) -> None:
        self._mail_loop = mail_loop
        self._closed = False
        self._pending: set[asyncio.Future[Any]] = set()

    async def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        future: asyncio.Future[T] = self._mail_loop.create_future()
        if self._closed:
            raise RuntimeError("the caller of this send stopped waiting for it")
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        self._deliver((function, args, kwargs, future))
        return await future

    def _deliver(self, request: _Request) -> None:
        raise NotImplementedError

    def _reply(
        self, future: asyncio.Future[Any], result: Any = None, error: BaseException | None = None
    ) -> None:
        """Post a request's outcome to the mail loop: its result, or the exception it raised."""
        if error is not None:
            self._mail_loop.call_soon_threadsafe(_set_exception, future, error)
        else:
            self._mail_loop.call_soon_threadsafe(_set_result, future, result)

    def close(self) -> None:
        """The caller stopped waiting: fail what it never answered, so nothing waits forever."""
        self._closed = True
        for future in list(self._pending):
            self._mail_loop.call_soon_threadsafe(
                _set_exception, future, RuntimeError("the caller of this send stopped waiting")
            )


class _SyncCaller(Caller):
    """A thread blocked on the send: it runs requests while it waits."""

    def __init__(self, mail_loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(mail_loop)
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def _deliver(self, request: _Request) -> None:
        self.inbox.put(request)

    def serve_until(self, done: concurrent.futures.Future[Any]) -> None:
        done.add_done_callback(lambda _: self.inbox.put(_DONE))
        while (request := self.inbox.get()) is not _DONE:
            function, args, kwargs, future = request
            try:
                result = function(*args, **kwargs)
            except BaseException as exc:  # raised on the mail loop, where the send handles it
                self._reply(future, error=exc)
            else:
                self._reply(future, result)


class _AsyncCaller(Caller):
    """An async caller (its own event loop): it awaits requests beside the send
    and runs each through ``sync_to_async``, in its own context, so they use the
    same thread and connection as its other sync work."""

    def __init__(
        self, mail_loop: asyncio.AbstractEventLoop, own_loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(mail_loop)
        self._own_loop = own_loop
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()

    def _deliver(self, request: _Request) -> None:
        self._own_loop.call_soon_threadsafe(self.inbox.put_nowait, request)

    async def serve_until(self, done: asyncio.Future[Any]) -> None:
        done.add_done_callback(lambda _: self.inbox.put_nowait(_DONE))
        while (request := await self.inbox.get()) is not _DONE:
            function, args, kwargs, future = request
            try:
                result = await sync_to_async(function)(*args, **kwargs)
            except BaseException as exc:  # raised on the mail loop, where the send handles it
                self._reply(future, error=exc)
            else:
                self._reply(future, result)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


# The caller of the coroutine running now on the mail loop (tasks it starts inherit it).
current_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "xoauth2_mail_caller", default=None
)


async def _on_behalf_of(caller: Caller, coroutine: Coroutine[Any, Any, T]) -> T:
    current_caller.set(caller)
    return await coroutine


class MailLoop:
    def __init__(self) -> None:
        self.reset_after_fork()

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _ensure_running(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or not self._loop.is_running():
                loop = asyncio.new_event_loop()
                started = threading.Event()
                thread = threading.Thread(
                    target=self._run, args=(loop, started), name="xoauth2-mail-loop", daemon=True
                )
                thread.start()
                started.wait()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        loop.run_forever()

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the mail loop; block until it is done, doing its ORM work."""
        if self.in_loop_thread():
            coroutine.close()
            raise RuntimeError(
                "send_messages() was called from the mail loop itself (e.g. from a signal "
                "receiver running there); use `await backend.asend_messages()` instead."
            )
        loop = self._ensure_running()
        caller = _SyncCaller(loop)
        future = asyncio.run_coroutine_threadsafe(_on_behalf_of(caller, coroutine), loop)
        try:
            caller.serve_until(future)
        except BaseException:  # e.g. KeyboardInterrupt: stop the send, never leave it waiting
            future.cancel()
            raise
        finally:
            caller.close()
        return future.result()

    async def arun(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Await ``coroutine`` on the mail loop without blocking the caller's loop."""
        if self.in_loop_thread():
            return await coroutine
        loop = self._ensure_running()
        caller = _AsyncCaller(loop, asyncio.get_running_loop())
        future = asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(_on_behalf_of(caller, coroutine), loop)
        )
        try:
            await caller.serve_until(future)
        except BaseException:
            future.cancel()
            raise
        finally:
            caller.close()
        return await future

    def run_if_started(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> None:
        """Run ``coroutine`` if this process's loop runs (at exit: never start one)."""
        loop = self._loop
        if loop is None or not loop.is_running():
            coroutine.close()
            return
        try:
            asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)
        except Exception:  # at exit, a server that does not answer QUIT changes nothing
            return


def start_background_task(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """A task on the running (mail) loop that belongs to no caller: it outlives the send
    that started it, so its ORM work must not be handed to that send's caller."""
    context = contextvars.copy_context()
    context.run(current_caller.set, None)
    return asyncio.get_running_loop().create_task(coroutine, context=context)


def event_loop_running_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _with_fresh_connections(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    # Like a request: connections past CONN_MAX_AGE, or broken (a restarted
    # database), are closed before and after, never kept by an idle thread.
    close_old_connections()
    try:
        return function(*args, **kwargs)
    finally:
        close_old_connections()


class _ThreadPools:
    """This process's two lazily started thread pools."""

    def __init__(self) -> None:
        self.reset_after_fork()

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._sync_worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._orm_thread: concurrent.futures.ThreadPoolExecutor | None = None

    def sync_worker(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._sync_worker is None:
                self._sync_worker = concurrent.futures.ThreadPoolExecutor(
                    max_workers=SYNC_WORKERS, thread_name_prefix="xoauth2-mail-sync"
                )
            return self._sync_worker

    def orm_thread(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._orm_thread is None:
                self._orm_thread = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="xoauth2-mail-orm"
                )
            return self._orm_thread


# send_mail() from an async view (a thread whose event loop runs, where Django
# forbids the ORM) is run, blocking as its contract says, on this many threads.
SYNC_WORKERS = 4

mail_loop = MailLoop()
_pools = _ThreadPools()


def _after_fork_in_child() -> None:
    # The parent's loop thread and pool threads do not exist in the child, a
    # pool would count them as alive and never start its own, and a lock one of
    # them held at fork() would stay locked for ever: start afresh. The objects
    # stay the same (other modules imported them); their state is new.
    mail_loop.reset_after_fork()
    _pools.reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def run_blocking_in_worker(function: Callable[..., T], *args: Any) -> T:
    """Run ``function`` on a sync worker thread and wait: for sync work called
    from a thread whose event loop runs (an async view calling ``send_mail()``)."""
    return _pools.sync_worker().submit(_with_fresh_connections, function, *args).result()


async def run_orm(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ORM work from the mail loop in the thread of the caller waiting for it.

    Outside any caller (nothing waits for this coroutine), in a dedicated thread.
    """
    caller = current_caller.get()
    if caller is not None:
        return await caller.call(function, *args, **kwargs)
    call = sync_to_async(
        _with_fresh_connections, thread_sensitive=False, executor=_pools.orm_thread()
    )
    return await call(function, *args, **kwargs)
