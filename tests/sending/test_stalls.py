"""A server that stops answering costs a call at most one wait of ``timeout`` per
connection opened for the purpose, and is not tried again within the call: the message
it stalled on is reported as not sent, or as undetermined when the end of its data may
have arrived (never re-sent), and the rest of that mailbox's messages are not sent."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import BinaryIO, Literal

import pytest
from django.core.mail import EmailMessage

from django_xoauth2_mail.backends import EmailBackend
from django_xoauth2_mail.exceptions import SendError
from tests.conftest import SENDER

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 2.0
Stall = Literal["DATA", "MESSAGE", "END"] | None


class StallingServer:
    """Just enough SMTP on 127.0.0.1 to log anyone in, then stop answering at ``stall``:

    ``"DATA"``: never answers the DATA command; ``"MESSAGE"``: answers 354, then stops
    reading the socket; ``"END"``: reads the whole message, never answers it. ``None``
    behaves. Its receive buffer is small, so a large message fills it quickly.
    """

    def __init__(self, *, pipelining: bool = False) -> None:
        self.stall: Stall = None
        self.good_messages = 0  # messages answered normally before the stall
        self.accepted = 0
        self.pipelining = pipelining
        self.connections = 0
        self.messages: list[bytes] = []
        self._stop = threading.Event()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> StallingServer:
        self._start(self._accept)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            self._start(self._serve, connection)

    def _serve(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rb") as reader:
            connection.settimeout(30)
            connection.sendall(b"220 stall.test ESMTP\r\n")
            for line in reader:
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    extra = b"250-PIPELINING\r\n" if self.pipelining else b""
                    connection.sendall(b"250-stall.test\r\n" + extra + b"250 AUTH XOAUTH2\r\n")
                elif verb == b"AUTH":
                    connection.sendall(b"235 2.7.0 Accepted\r\n")
                elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    connection.sendall(b"250 OK\r\n")
                elif verb == b"DATA":
                    if not self._take_message(connection, reader):
                        self._stop.wait()  # silent, and reading nothing, until the test ends
                        return
                elif verb == b"QUIT":
                    connection.sendall(b"221 Bye\r\n")
                    return

    def _take_message(self, connection: socket.socket, reader: BinaryIO) -> bool:
        """Answer DATA and the message unless told to stall; False when stalling."""
        stall = self.stall if self.accepted >= self.good_messages else None
        if stall == "DATA":
            return False
        connection.sendall(b"354 Go ahead\r\n")
        if stall == "MESSAGE":
            return False
        self.messages.append(b"".join(iter(reader.readline, b".\r\n")))
        if stall == "END":
            return False
        connection.sendall(b"250 2.0.0 OK\r\n")
        self.accepted += 1
        return True


@pytest.fixture
def stalling(request, settings, mailbox) -> Iterator[StallingServer]:
    pipelining = getattr(request, "param", False)
    with StallingServer(pipelining=pipelining) as server:
        settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SMTP_PORT"] = server.port
        settings.XOAUTH2_MAIL["SMTP_TIMEOUT"] = TIMEOUT
        yield server


def batch(count: int, attachment: int = 0) -> list[EmailMessage]:
    messages = [EmailMessage(f"M{n}", "Body", SENDER, ["to@example.org"]) for n in range(count)]
    if attachment:
        messages[0].attach("big.bin", b"\x7f" * attachment, "application/octet-stream")
    return messages


def send(messages: list[EmailMessage], backend: EmailBackend | None = None) -> SendError:
    started = time.monotonic()
    with pytest.raises(SendError) as caught:
        (backend or EmailBackend()).send_messages(messages)
    assert time.monotonic() - started < 5 * TIMEOUT  # a guard against hangs, not a benchmark
    return caught.value


@pytest.mark.parametrize("stalling", [False, True], ids=["plain", "pipelining"], indirect=True)
def test_a_server_that_never_answers_data_is_not_tried_again(stalling):
    stalling.stall = "DATA"

    error = send(batch(3))

    assert stalling.connections == 1
    assert error.sent == 0 and stalling.messages == []
    assert [f.index for f in error.failures] == [0, 1, 2]
    assert not any(f.undetermined for f in error.failures)  # surely not delivered
    assert "stopped answering" in error.failures[0].error
    assert "not tried again" in error.failures[1].error


def test_a_stall_after_good_messages_of_the_call_gets_no_new_connection(stalling):
    stalling.stall, stalling.good_messages = "DATA", 1

    error = send(batch(3))

    assert stalling.connections == 1  # proven in this call: its silence is the server's
    assert error.sent == 1
    assert [f.index for f in error.failures] == [1, 2]


def test_a_server_that_stops_reading_mid_data_is_not_tried_again(stalling):
    stalling.stall = "MESSAGE"

    # Larger than every socket buffer between the two ends, so the writes stall.
    error = send(batch(2, attachment=12 * 1024 * 1024))

    assert stalling.connections == 1
    first, second = error.failures
    assert not first.undetermined and "stopped reading" in first.error
    assert "not tried again" in second.error
    assert error.sent == 0


def test_no_reply_to_the_end_of_data_is_undetermined_and_nothing_more_is_tried(stalling):
    stalling.stall = "END"

    error = send(batch(2))

    assert stalling.connections == 1
    assert len(stalling.messages) == 1  # the first arrived once, was never re-sent
    first, second = error.failures
    assert first.undetermined and "stopped answering" in first.error
    assert not second.undetermined and "not tried again" in second.error


def test_a_kept_connection_that_goes_silent_gets_one_new_connection(stalling):
    with EmailBackend() as backend:
        assert backend.send_messages(batch(1)) == 1
        stalling.stall = "DATA"

        error = send(batch(1), backend)

    # The kept connection stalled, one new connection stalled too: no third.
    assert stalling.connections == 2
    assert error.sent == 0 and not error.failures[0].undetermined
