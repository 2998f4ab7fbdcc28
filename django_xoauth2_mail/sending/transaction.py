"""One SMTP mail transaction (MAIL, RCPT..., DATA, message), pipelined when
the server offers PIPELINING (RFC 2920).

Pipelining sends MAIL, every RCPT and DATA in one write and reads their
replies in order: a message costs two round trips instead of three plus one
per recipient. Every reply is still checked, recipient by recipient.

aiosmtplib reads one reply per command and drops data that arrives while no
command is waiting, which loses replies that arrive together. So the
connection's protocol object gets a subclass (`PipeliningProtocol`) that,
while a transaction runs, keeps every byte and parses replies on demand; the
rest of the time it behaves exactly like aiosmtplib's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import LINE_ENDINGS_REGEX, PERIOD_REGEX, SMTPProtocol

# Messages above this size are written in pieces of this size (see _write_message).
WRITE_CHUNK = 256 * 1024
# Replies that mean "not now": the same transaction may succeed later.
TRANSIENT_CODES = frozenset({421, 450, 451, 452, 454})


# Asked just before the message data (and its final ".") goes out; False withdraws
# the message: the connection is dropped, so the server cannot deliver it.
BeforeEndOfData = Callable[[], Awaitable[bool]]


class ConnectionLostBeforeData(Exception):
    """The connection died before the end of the message was sent: retrying is safe."""


class ServerStalled(ConnectionLostBeforeData):
    """The server stopped answering (a wait ran out) before the end of the message
    went out. It cannot have accepted the message; but a server that stalls once
    will most likely stall again, so the session does not simply retry (see
    SMTPSession._attempt)."""


@dataclass
class TransactionResult:
    delivered_to: list[str] = field(default_factory=list)
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    error: str | None = None
    # The message as a whole hit a temporary condition (4xx on MAIL/DATA/end).
    transient: bool = False
    # The end of DATA went out but no reply came: it may have been delivered.
    undetermined: bool = False
    # A wait for the server ran out: the connection is closed, and the server is
    # not tried again within this call.
    stalled: bool = False


class PipeliningProtocol(SMTPProtocol):
    # Class-level defaults: instances become this class after connecting
    # (see adopt()), so __init__ never runs for them.
    _keep_everything = False
    _arrived: asyncio.Event | None = None

    def data_received(self, data: bytes) -> None:
        if not self._keep_everything:
            super().data_received(data)
            return
        self._buffer.extend(data)
        if self._arrived is not None:
            self._arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._arrived is not None:
            self._arrived.set()  # wake a reader so it sees the disconnect

    @contextlib.contextmanager
    def keeping_everything(self) -> Iterator[None]:
        self._keep_everything, self._arrived = True, asyncio.Event()
        try:
            yield
        finally:
            self._keep_everything, self._arrived = False, None

    async def read_reply(self, timeout: float | None) -> aiosmtplib.SMTPResponse:
        """The next reply, from what is buffered or from what arrives next."""
        assert self._arrived is not None, "only inside keeping_everything()"
        while True:
            reply = self._read_response_from_buffer()
            if reply is not None:
                return reply
            if self.transport is None or self.transport.is_closing():
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response"
                ) from None


def adopt(client: aiosmtplib.SMTP) -> PipeliningProtocol:
    protocol = client.protocol
    assert protocol is not None
    if not isinstance(protocol, PipeliningProtocol):
        protocol.__class__ = PipeliningProtocol
    return protocol  # type: ignore[return-value]


def drop(client: aiosmtplib.SMTP) -> None:
    """Close at once, discarding what is still buffered for a server that stopped
    reading (aiosmtplib's close() would keep trying to send it)."""
    if isinstance(client.transport, asyncio.Transport):
        client.transport.abort()
    client.close()


def wire_data(data: bytes) -> bytes:
    """The message as DATA sends it: CRLF line endings, leading dots doubled.

    Django already produces CRLF, so the common case copies nothing.
    """
    if not (data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")):
        data = LINE_ENDINGS_REGEX.sub(b"\r\n", data)
    if data.startswith(b".") or b"\n." in data:
        data = PERIOD_REGEX.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


async def transact(
    client: aiosmtplib.SMTP,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    *,
    options: Sequence[str],
    encoding: str,
    timeout: float,
    before_end_of_data: BeforeEndOfData | None = None,
) -> TransactionResult:
    protocol = adopt(client)
    mail = _command(b"MAIL FROM:", sender, options, encoding)
    rcpts = [_command(b"RCPT TO:", recipient, (), encoding) for recipient in recipients]
    pipelined = client.supports_extension("pipelining")
    with protocol.keeping_everything():
        try:
            if pipelined:
                protocol.write(mail + b"".join(rcpts) + b"DATA\r\n")
                replies = [await protocol.read_reply(timeout) for _ in range(len(rcpts) + 2)]
            else:
                replies = []
                for command in [mail, *rcpts, b"DATA\r\n"]:
                    protocol.write(command)
                    replies.append(await protocol.read_reply(timeout))
                    if command is mail and replies[0].code != 250:
                        break
        except aiosmtplib.SMTPTimeoutError:
            drop(client)
            raise ServerStalled(_no_reply(timeout, "to MAIL, RCPT or DATA")) from None
        except aiosmtplib.SMTPServerDisconnected as exc:
            client.close()
            raise ConnectionLostBeforeData(str(exc)) from None
        return await _finish(
            client, protocol, recipients, replies, data, timeout, before_end_of_data
        )


def _command(verb: bytes, address: str, options: Sequence[str], encoding: str) -> bytes:
    line = verb + quote_address(address).encode(encoding)
    for option in options:
        line += b" " + option.encode("ascii")
    return line + b"\r\n"


async def _finish(
    client: aiosmtplib.SMTP,
    protocol: PipeliningProtocol,
    recipients: Sequence[str],
    replies: list[aiosmtplib.SMTPResponse],
    data: bytes,
    timeout: float,
    before_end_of_data: BeforeEndOfData | None = None,
) -> TransactionResult:
    mail_reply = replies[0]
    result = TransactionResult()
    if mail_reply.code != 250:
        result.error = f"the server refused the sender: {mail_reply.code} {mail_reply.message}"
        result.transient = mail_reply.code in TRANSIENT_CODES
        return await _abandon(client, protocol, replies, len(recipients) + 2, result)
    accepted = []
    for recipient, reply in zip(recipients, replies[1:-1], strict=False):
        if reply.code in (250, 251):
            accepted.append(recipient)
        else:
            result.refused[recipient] = (reply.code, reply.message)
    data_reply = replies[-1] if len(replies) == len(recipients) + 2 else None
    if not accepted or data_reply is None or data_reply.code != 354:
        if accepted and data_reply is not None:
            result.error = f"the server refused DATA: {data_reply.code} {data_reply.message}"
            result.transient = data_reply.code in TRANSIENT_CODES
        else:
            result.error = "the server refused every recipient"
        return await _abandon(client, protocol, replies, len(recipients) + 2, result)
    if before_end_of_data is not None and not await before_end_of_data():
        # The outbox took the message back (this worker's lease ran out): the
        # server waits for data that must not come, so drop the connection.
        drop(client)
        result.error = "the message was withdrawn before its data was sent"
        return result
    # Until the final "." has gone out, the server cannot have accepted the
    # message: sending it again on a new connection would be safe.
    try:
        await _write_message(protocol, wire_data(data), timeout)
    except TimeoutError:
        drop(client)
        raise ServerStalled(
            f"the server stopped reading the message (nothing taken for {timeout:g} s)"
        ) from None
    except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
        client.close()
        raise ConnectionLostBeforeData(str(exc) or type(exc).__name__) from None
    try:
        final = await protocol.read_reply(timeout)
    except aiosmtplib.SMTPTimeoutError:
        return _stalled_after_message(client, protocol, result, timeout)
    except aiosmtplib.SMTPServerDisconnected as exc:
        client.close()
        result.undetermined = True
        result.error = f"no reply after the end of the message ({exc})"
        return result
    if final.code != 250:
        result.error = f"the server refused the message: {final.code} {final.message}"
        result.transient = final.code in TRANSIENT_CODES
        return result
    result.delivered_to = accepted
    return result


def _stalled_after_message(
    client: aiosmtplib.SMTP,
    protocol: PipeliningProtocol,
    result: TransactionResult,
    timeout: float,
) -> TransactionResult:
    """No reply to the end of the message within ``timeout``.

    Bytes still in our transport's buffer include the final "." (it is written
    last), so the server surely has not got it: not sent. Otherwise it may
    have been accepted: undetermined. Either way it is not sent again.
    """
    transport = protocol.transport
    unsent = isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size() > 0
    drop(client)  # not close(): that would still send the buffered final "." later
    result.stalled = True
    if unsent:
        result.error = (
            f"the server stopped reading before the end of the message "
            f"(nothing taken for {timeout:g} s); it was not delivered"
        )
    else:
        result.undetermined = True
        result.error = _no_reply(timeout, "after the end of the message")
    return result


def _no_reply(timeout: float, what: str) -> str:
    return f"the server stopped answering (no reply {what} within {timeout:g} s)"


async def _write_message(protocol: PipeliningProtocol, wire: bytes, timeout: float) -> None:
    """Write the message and its final ".".

    A small message goes in one write (one TLS record, one system call). A large
    one goes in pieces, waiting for the socket to take each: one write of 20 MB
    would have the TLS transport encrypt and buffer all of it at once, several
    times the message's size in memory.
    """
    if len(wire) <= WRITE_CHUNK:
        protocol.write(wire + b".\r\n")
        return
    view = memoryview(wire)
    for start in range(0, len(wire), WRITE_CHUNK):
        protocol.write(view[start : start + WRITE_CHUNK])  # type: ignore[arg-type]
        await asyncio.wait_for(protocol._drain_helper(), timeout)
    protocol.write(b".\r\n")


async def _abandon(
    client: aiosmtplib.SMTP,
    protocol: PipeliningProtocol,
    replies: list[aiosmtplib.SMTPResponse],
    expected: int,
    result: TransactionResult,
) -> TransactionResult:
    """End a transaction that will send no message, leaving the connection usable."""
    if len(replies) == expected and replies[-1].code == 354:
        # The server waits for message data that will never be sent; ending it
        # with an empty message could deliver one, so drop the connection.
        client.close()
        return result
    try:
        protocol.write(b"RSET\r\n")
        await protocol.read_reply(client.timeout)
    except aiosmtplib.SMTPTimeoutError:
        drop(client)
        result.stalled = True
    except (aiosmtplib.SMTPException, OSError):
        client.close()
    return result
