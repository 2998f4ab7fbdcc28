"""A fast SMTP sink for the benchmark, run in its own process.

It is written on plain asyncio streams (not aiosmtpd) so that the server is
never what limits a client's speed, and it runs in a child process so that its
work never competes with the client for the benchmark process's GIL.

What it speaks: EHLO (before TLS: ``PIPELINING``, ``8BITMIME``, ``SIZE``,
``STARTTLS``; after it: the same with ``AUTH PLAIN XOAUTH2`` instead of
``STARTTLS``, as submission servers do), STARTTLS, AUTH PLAIN (one fixed
user and password, for Django's backend), AUTH XOAUTH2 (initial response on
the AUTH line or after a ``334``), MAIL, RCPT, DATA, RSET, NOOP, QUIT.

The latency model. A provider is a network round trip away: a client that
sends something and waits for the answer pays one round trip, however many
commands it sent in that flight. So the sink reads what has arrived, answers
every complete command in it (in order), then waits ``delay`` once and writes
all those replies together. Django's smtplib sends MAIL, RCPT, DATA and the
message one by one and waits after each: four delays per message. A
pipelining client sends MAIL, RCPT and DATA in one flight, then the message:
two delays. The greeting and every other reply are delayed the same way. TLS
and TCP handshakes are not delayed (they are the same for every client).
With ``pipelining=False`` the extension is not offered, and a client that
still sends several commands in one flight is counted as a violation.

XOAUTH2 tokens are checked against the benchmark's OAuth2 server: the first
time the sink sees a token it asks the server's ``/userinfo`` endpoint (a
plain HTTP GET from a worker thread) whose account the token belongs to, and
remembers the answer, the way a provider caches a token's validation. So a
token the OAuth2 server did not issue, or issued for another account, is
refused with a 334 JSON challenge and a 535, as Gmail does.

Every received message is counted by its Message-ID; the parent reads the
counts (and refusals, violations) over a ``multiprocessing`` pipe.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import selectors
import ssl
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

# The one AUTH PLAIN account, for Django's SMTP backend.
PLAIN_USER = "django@bench.invalid"
PLAIN_PASSWORD = "benchmark-password"
# Advertised SIZE; a 20 MB attachment is ~27 MB once base64-encoded.
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
READ_CHUNK = 256 * 1024
MAX_LINE = 64 * 1024  # longer than any XOAUTH2 response; longer lines end the session
USERINFO_TIMEOUT = 10.0

_MESSAGE_ID = re.compile(rb"^message-id:\s*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)
_XOAUTH2_RESPONSE = re.compile(r"^user=([^\x01]*)\x01auth=Bearer ([^\x01]+)\x01\x01$")
_ERROR_CHALLENGE = base64.b64encode(
    json.dumps({"status": "401", "schemes": "Bearer", "scope": "https://mail.google.com/"}).encode()
)


@dataclass(frozen=True)
class Listener:
    """One listening port: its reply delay and whether it offers PIPELINING."""

    name: str
    delay: float  # seconds, once per flight of commands
    pipelining: bool = True


@dataclass(frozen=True)
class SinkOptions:
    listeners: tuple[Listener, ...]
    certfile: str
    keyfile: str
    userinfo_url: str


@dataclass
class SinkStats:
    messages: Counter[str] = field(default_factory=Counter)  # by Message-ID
    listener_of: dict[str, str] = field(default_factory=dict)  # Message-ID -> listener name
    connections: int = 0
    auth_plain: int = 0
    auth_xoauth2: int = 0
    auth_refused: int = 0
    token_checks: int = 0  # /userinfo calls
    pipelining_violations: int = 0
    protocol_errors: int = 0

    def summary(self, prefix: str | None) -> dict[str, Any]:
        counts = {
            mid: n for mid, n in self.messages.items() if prefix is None or mid.startswith(prefix)
        }
        return {
            "counts": counts,
            "listeners": {mid: self.listener_of[mid] for mid in counts},
            "connections": self.connections,
            "auth_plain": self.auth_plain,
            "auth_xoauth2": self.auth_xoauth2,
            "auth_refused": self.auth_refused,
            "token_checks": self.token_checks,
            "pipelining_violations": self.pipelining_violations,
            "protocol_errors": self.protocol_errors,
        }


class TokenChecker:
    """Whose account a token is, asked once per token of the OAuth2 server."""

    def __init__(self, userinfo_url: str, stats: SinkStats) -> None:
        self.userinfo_url = userinfo_url
        self.stats = stats
        self._known: dict[str, str | None] = {}

    async def account_of(self, token: str) -> str | None:
        if token not in self._known:
            self.stats.token_checks += 1
            self._known[token] = await asyncio.to_thread(self._ask, token)
        return self._known[token]

    def _ask(self, token: str) -> str | None:
        request = urllib.request.Request(
            self.userinfo_url, headers={"Authorization": f"Bearer {token}"}
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
        try:
            with opener.open(request, timeout=USERINFO_TIMEOUT) as response:
                email = json.loads(response.read()).get("email")
        except (urllib.error.URLError, ValueError, OSError):
            return None
        return email.lower() if isinstance(email, str) else None


class Session:
    """One SMTP connection's state; ``handle_line`` returns the replies to one command."""

    def __init__(self, sink: Sink, listener: Listener) -> None:
        self.sink, self.listener = sink, listener
        self.tls = False
        self.user: str | None = None
        self.sender: str | None = None
        self.recipients = 0
        self.in_data = False
        self.scanned = 0  # bytes of the message already searched for its end
        self.start_tls = False  # set by STARTTLS: upgrade once its reply is out
        self.closing = False
        self.pending_auth: str | None = None  # "PLAIN", "XOAUTH2" or "XOAUTH2-REFUSED"

    def ehlo(self) -> bytes:
        lines = ["250-sink.bench.invalid"]
        if self.listener.pipelining:
            lines.append("250-PIPELINING")
        lines += ["250-8BITMIME", f"250-SIZE {MAX_MESSAGE_SIZE}"]
        lines.append("250 AUTH PLAIN XOAUTH2" if self.tls else "250 STARTTLS")
        return "\r\n".join(lines).encode() + b"\r\n"

    async def handle_line(self, line: bytes) -> bytes:
        if self.pending_auth is not None:
            return await self._auth_continuation(line.strip())
        text = line.decode("utf-8", "replace").strip()
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if verb in ("EHLO", "HELO"):
            self.sender, self.recipients = None, 0
            return self.ehlo() if verb == "EHLO" else b"250 sink.bench.invalid\r\n"
        if verb == "STARTTLS" and not self.tls:
            self.start_tls = True
            return b"220 2.0.0 Ready to start TLS\r\n"
        if verb == "AUTH":
            return await self._auth(argument)
        if verb == "MAIL":
            return self._mail(argument)
        if verb == "RCPT":
            if self.sender is None:
                return b"503 5.5.1 MAIL first\r\n"
            self.recipients += 1
            return b"250 2.1.5 OK\r\n"
        if verb == "DATA":
            if not self.recipients:
                return b"503 5.5.1 RCPT first\r\n"
            self.in_data = True
            return b"354 Go ahead\r\n"
        if verb == "RSET":
            self.sender, self.recipients = None, 0
            return b"250 2.0.0 OK\r\n"
        if verb == "NOOP":
            return b"250 2.0.0 OK\r\n"
        if verb == "QUIT":
            self.closing = True
            return b"221 2.0.0 Bye\r\n"
        self.sink.stats.protocol_errors += 1
        return b"500 5.5.2 Unrecognised command\r\n"

    def _mail(self, argument: str) -> bytes:
        if self.user is None:
            return b"530 5.7.0 Authentication required\r\n"
        size = re.search(r"\bSIZE=(\d+)", argument, re.IGNORECASE)
        if size and int(size.group(1)) > MAX_MESSAGE_SIZE:
            return b"552 5.3.4 Message too big\r\n"
        self.sender, self.recipients = argument, 0
        return b"250 2.1.0 OK\r\n"

    async def _auth(self, argument: str) -> bytes:
        if not self.tls:
            return b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        if self.user is not None:
            return b"503 5.5.1 Already authenticated\r\n"
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in ("PLAIN", "XOAUTH2"):
            return b"504 5.5.4 Unrecognised authentication type\r\n"
        if not initial:
            self.pending_auth = mechanism
            return b"334 \r\n"
        return await self._check(mechanism, initial.encode())

    async def _auth_continuation(self, response: bytes) -> bytes:
        mechanism, self.pending_auth = self.pending_auth, None
        if mechanism == "XOAUTH2-REFUSED":  # the client's empty line after our challenge
            return b"535 5.7.8 Username and Password not accepted\r\n"
        return await self._check(str(mechanism), response)

    async def _check(self, mechanism: str, response: bytes) -> bytes:
        try:
            decoded = base64.b64decode(response, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return b"501 5.5.2 Cannot decode response\r\n"
        stats = self.sink.stats
        if mechanism == "PLAIN":
            _, user, password = (decoded.split("\0") + ["", "", ""])[:3]
            if user == PLAIN_USER and password == PLAIN_PASSWORD:
                self.user = user
                stats.auth_plain += 1
                return b"235 2.7.0 Accepted\r\n"
            stats.auth_refused += 1
            return b"535 5.7.8 Username and Password not accepted\r\n"
        match = _XOAUTH2_RESPONSE.match(decoded)
        account = await self.sink.tokens.account_of(match.group(2)) if match else None
        if match and account is not None and account == match.group(1).lower():
            self.user = account
            stats.auth_xoauth2 += 1
            return b"235 2.7.0 Accepted\r\n"
        stats.auth_refused += 1
        self.pending_auth = "XOAUTH2-REFUSED"
        return b"334 " + _ERROR_CHALLENGE + b"\r\n"

    def message_received(self, data: bytes) -> bytes:
        self.in_data = False
        self.sender, self.recipients = None, 0
        headers = data[: data.find(b"\r\n\r\n")]
        found = _MESSAGE_ID.search(headers)
        mid = found.group(1).decode("ascii", "replace") if found else ""
        self.sink.stats.messages[mid] += 1
        self.sink.stats.listener_of[mid] = self.listener.name
        return b"250 2.0.0 OK: queued\r\n"


class Sink:
    def __init__(self, options: SinkOptions) -> None:
        self.options = options
        self.stats = SinkStats()
        self.tokens = TokenChecker(options.userinfo_url, self.stats)
        self.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls_context.load_cert_chain(options.certfile, options.keyfile)

    async def handle(
        self, listener: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.stats.connections += 1
        session = Session(self, listener)
        try:
            await self._reply(listener, writer, [b"220 sink.bench.invalid ESMTP ready\r\n"])
            await self._serve(listener, session, reader, writer)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # a client that hangs up without QUIT (smtplib after a TLS QUIT does)
        finally:
            writer.close()

    async def _serve(
        self,
        listener: Listener,
        session: Session,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        buffer = bytearray()
        while not session.closing:
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                return
            buffer += chunk
            replies = await self._consume(session, buffer)
            if replies is None:  # an overlong line or message: drop the client
                self.stats.protocol_errors += 1
                return
            if replies:
                await self._reply(listener, writer, replies)
            if session.start_tls:
                session.start_tls, session.tls = False, True
                buffer.clear()  # RFC 3207: nothing sent before the handshake counts
                await writer.start_tls(self.tls_context)

    async def _consume(self, session: Session, buffer: bytearray) -> list[bytes] | None:
        """Answer every complete command (and message) in ``buffer``, removing them."""
        replies: list[bytes] = []
        commands = 0
        while buffer and not session.closing and not session.start_tls:
            if session.in_data:
                end = _end_of_data(buffer, session.scanned)
                if end is None:
                    session.scanned = max(0, len(buffer) - 4)
                    return None if len(buffer) > MAX_MESSAGE_SIZE + MAX_LINE else replies
                session.scanned = 0
                replies.append(session.message_received(bytes(buffer[: end[0]])))
                del buffer[: end[1]]
                continue
            newline = buffer.find(b"\n")
            if newline < 0:
                return None if len(buffer) > MAX_LINE else replies
            line = bytes(buffer[: newline + 1])
            del buffer[: newline + 1]
            commands += 1
            if commands == 2 and not session.listener.pipelining:
                self.stats.pipelining_violations += 1
            replies.append(await session.handle_line(line))
        return replies

    async def _reply(
        self, listener: Listener, writer: asyncio.StreamWriter, replies: list[bytes]
    ) -> None:
        if listener.delay:
            await asyncio.sleep(listener.delay)  # one round trip for the whole flight
        writer.write(b"".join(replies))
        await writer.drain()


def _end_of_data(buffer: bytearray, start: int) -> tuple[int, int] | None:
    """Where the message in ``buffer`` ends (keeping its last CRLF) and where the
    terminator ends, or None while the ``CRLF.CRLF`` has not arrived. ``start``:
    the part before it was searched already (a big message comes in many reads)."""
    if buffer.startswith(b".\r\n"):
        return 0, 3  # an empty message
    found = buffer.find(b"\r\n.\r\n", start)
    return None if found < 0 else (found + 2, found + 5)


async def _serve_until_told(options: SinkOptions, conn: Connection) -> None:
    sink = Sink(options)
    servers: list[asyncio.Server] = []
    ports: dict[str, int] = {}
    for listener in options.listeners:

        async def on_connect(
            reader: asyncio.StreamReader,
            writer: asyncio.StreamWriter,
            listener: Listener = listener,
        ) -> None:
            await sink.handle(listener, reader, writer)

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0, limit=MAX_LINE)
        servers.append(server)
        ports[listener.name] = server.sockets[0].getsockname()[1]
    conn.send(("ready", ports))
    try:
        while True:
            request = await asyncio.to_thread(_receive, conn)
            if request is None or request[0] == "stop":
                return
            if request[0] == "stats":
                conn.send(("stats", sink.stats.summary(request[1])))
            elif request[0] == "cpu":  # seconds of CPU this process has used
                conn.send(("cpu", time.process_time()))
            else:
                conn.send(("error", f"unknown request {request[0]!r}"))
    finally:
        for server in servers:
            server.close()


def _receive(conn: Connection) -> tuple[Any, ...] | None:
    try:
        request: tuple[Any, ...] = conn.recv()
    except (EOFError, OSError):  # the parent is gone: stop
        return None
    return request


def serve(options: SinkOptions, conn: Connection) -> None:
    """The child process's entry point: serve until told to stop or the parent goes."""
    # select() takes its timeout in microseconds; epoll (asyncio's default) rounds it
    # up to whole milliseconds, which would make every delayed reply up to 1 ms late,
    # and later the more connections wait at once. The sink has a few sockets only.
    with asyncio.Runner(loop_factory=_precise_loop) as runner:
        runner.run(_serve_until_told(options, conn))


def _precise_loop() -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(selectors.SelectSelector())
