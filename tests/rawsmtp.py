"""A bare SMTP server for the exchanges aiosmtpd will not produce (a 354 after every
recipient was refused, a connection cut in the middle of the message data).

Each connection is served by a script: a coroutine that gets a ``Conversation`` and says
what the server says. It runs on 127.0.0.1, port 0, in a thread of its own, and records
every line and every connection.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

LINE_TIMEOUT = 10.0  # a script waits this long for a client line, then gives up


@dataclass
class Conversation:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: list[bytes] = field(default_factory=list)

    async def line(self) -> bytes:
        data = await asyncio.wait_for(self.reader.readline(), LINE_TIMEOUT)
        self.received.append(data)
        return data

    async def say(self, *replies: str) -> None:
        self.writer.write(b"".join(r.encode() + b"\r\n" for r in replies))
        await self.writer.drain()

    async def greet_and_log_in(self, *, pipelining: bool = True) -> None:
        """Greeting, EHLO (with PIPELINING if asked) and any AUTH XOAUTH2 accepted."""
        await self.say("220 raw.test ESMTP")
        await self.line()  # EHLO
        extensions = ["250-raw.test", "250-AUTH XOAUTH2"]
        if pipelining:
            extensions.append("250-PIPELINING")
        await self.say(*extensions, "250 8BITMIME")
        await self.line()  # AUTH XOAUTH2 <token>
        await self.say("235 2.7.0 Accepted")

    async def read_data(self) -> bytes:
        """The message data up to the final "." line."""
        data = await asyncio.wait_for(self.reader.readuntil(b"\r\n.\r\n"), LINE_TIMEOUT)
        return data[: -len(b".\r\n")]


Script = Callable[[Conversation, int], Awaitable[None]]  # (conversation, connection number)


class RawSMTPServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.conversations: list[Conversation] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conversation = Conversation(reader, writer)
        self.conversations.append(conversation)
        try:
            await self.script(conversation, len(self.conversations))
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: what it did is in conversation.received
        finally:
            writer.close()

    def __enter__(self) -> RawSMTPServer:
        self._thread.start()
        # A whole message fits in the reader's buffer (read_data reads up to the final ".").
        start = asyncio.start_server(self._serve, "127.0.0.1", 0, limit=64 * 2**20)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shut_down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shut_down(self) -> None:
        assert self._server is not None
        self._server.close()
        for conversation in self.conversations:
            conversation.writer.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
