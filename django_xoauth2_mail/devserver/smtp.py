"""An SMTP server that, like Gmail and Microsoft 365, accepts mail only after AUTH XOAUTH2
or, like Dovecot and other standards-compliant servers, AUTH OAUTHBEARER (RFC 7628).

It runs aiosmtpd's ``Controller`` (an event loop in a daemon thread) and records every message
and every authentication attempt, so tests can assert on the exact bytes and envelope the
client sent. Token checking is delegated to a callable, normally
``OAuth2Server.validate_access_token``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import datetime
import json
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, AnyStr, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from .tls import check_loopback_host, make_self_signed_certificate, server_ssl_context

__all__ = ["AuthAttempt", "ReceivedMessage", "XOAuth2SMTPServer"]

logger = logging.getLogger(__name__)

Security = Literal["none", "starttls", "tls"]

ACCEPTED = "235 2.7.0 Accepted"
LINE_TOO_LONG = "500 5.5.2 Line too long"
CANNOT_DECODE = "501 5.5.2 Cannot Decode response"
TEMPORARY_FAILURE = "454 4.7.0 Temporary authentication failure"
# Gmail's answer, line for line: the client sees one reply with two lines.
BAD_CREDENTIALS = (
    "535-5.7.8 Username and Password not accepted. The XOAUTH2 access token is invalid,",
    "535 5.7.8 expired or revoked (django_xoauth2_mail development server)",
)
# What Gmail base64-encodes in its 334 challenge after a bad token.
ERROR_CHALLENGE = {"status": "401", "schemes": "Bearer", "scope": "https://mail.google.com/"}
# RFC 7628 section 3.2.2: an RFC 6750 error code, the scope, and where the issuer that
# the server trusts publishes its metadata (added when the server knows it).
OAUTHBEARER_ERROR_CHALLENGE = {"status": "invalid_token", "scope": "https://mail.google.com/"}
MECHANISMS = ("XOAUTH2", "OAUTHBEARER")
# aiosmtpd's fixed wording for an overlong command; servers that cap AUTH lines say this.
_AIOSMTPD_TOO_LONG = "500 Command line too long"
# Scripted "replies" that misbehave instead of answering (see scripted_replies).
DROP = "DROP"  # close the connection without a reply
HANG = "HANG"  # never reply


@dataclass(frozen=True)
class ReceivedMessage:
    """One message as the server received it (``data`` is dot-unstuffed, CRLFs kept)."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    auth_user: str
    received_at: datetime.datetime
    eml_path: Path | None = None


@dataclass(frozen=True)
class AuthAttempt:
    """One AUTH XOAUTH2 exchange that got as far as a user and a token."""

    user: str
    accepted: bool
    initial_response_on_auth_line: bool
    temporary_failure: bool = False
    # Kept so tests can tell which token a client used, but never shown in logs or diffs.
    token: str = field(default="", repr=False)
    mechanism: str = "XOAUTH2"
    # The decoded initial response, byte for byte (it holds the token).
    initial_response: bytes = field(default=b"", repr=False)
    # The client's raw line after the server's error challenge (None: no challenge).
    answer_to_challenge: bytes | None = None


def parse_xoauth2_response(payload: bytes) -> tuple[str, str] | None:
    """Split ``user=ADDR\\x01auth=Bearer TOKEN\\x01\\x01`` into (ADDR, TOKEN), else None."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.endswith("\x01\x01"):
        return None
    fields = dict(part.partition("=")[::2] for part in text[:-2].split("\x01"))
    user, auth = fields.get("user", ""), fields.get("auth", "")
    scheme, _, token = auth.partition(" ")
    if not user or scheme.lower() != "bearer" or not token:
        return None
    return user, token


def parse_oauthbearer_response(payload: bytes) -> tuple[str, str] | None:
    """Split RFC 7628's ``n,a=ADDR,^Ahost=...^Aport=...^Aauth=Bearer TOKEN^A^A`` into
    (ADDR, TOKEN), else None. ADDR is "" when the GS2 header names no authzid."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return None
    header, separator, rest = text.partition("\x01")
    flag, _, after_flag = header.partition(",")
    authzid, comma, tail = after_flag.partition(",")
    if not separator or flag not in ("n", "y") or not comma or tail or not rest.endswith("\x01"):
        return None
    if authzid and not authzid.startswith("a="):
        return None
    user = authzid[2:].replace("=2C", ",").replace("=3D", "=")
    fields = dict(part.partition("=")[::2] for part in rest[:-2].split("\x01") if part)
    scheme, _, token = fields.get("auth", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return user, token


PARSERS: dict[str, Callable[[bytes], tuple[str, str] | None]] = {
    "XOAUTH2": parse_xoauth2_response,
    "OAUTHBEARER": parse_oauthbearer_response,
}


class _SameLimitForEveryCommand(dict[str, int]):
    """One limit for every command line, whatever aiosmtpd tries to store.

    aiosmtpd widens MAIL's limit by 36 octets on every EHLO, without bound; a server that
    emulates a fixed line cap must not drift."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __getitem__(self, key: str) -> int:
        return self.limit

    def __setitem__(self, key: str, value: int) -> None:
        pass


class _Session(Session):
    # aiosmtpd assigns the deprecated ``login_data`` after each successful AUTH and logs a
    # warning every time; keep the value, drop the noise.
    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class _XOAuth2Protocol(SMTP):
    def __init__(
        self, handler: _Handler, *, max_line_length: int, server: XOAuth2SMTPServer, **kw: Any
    ) -> None:
        # SMTP.__init__ sizes its StreamReader from this attribute; it must admit a command
        # line of max_line_length so that our own limit, not the reader's, decides.
        self.line_length_limit = max(max_line_length, SMTP.line_length_limit)
        super().__init__(handler, **kw)
        # aiosmtpd counts a command line without its CRLF.
        self.command_size_limit = max_line_length - 2
        self.command_size_limits = _SameLimitForEveryCommand(max_line_length - 2)
        self._devserver = server

    def _create_session(self) -> Session:
        return _Session(self.loop)

    async def push(self, status: AnyStr) -> None:
        if status == _AIOSMTPD_TOO_LONG:
            status = LINE_TOO_LONG  # type: ignore[assignment]
        await super().push(status)

    async def check_auth_needed(self, caller_method: str) -> bool:
        # aiosmtpd's own auth_required warns on every connection when TLS is not required,
        # which the plain-TCP mode needs; enforce it here instead, with the same reply.
        if self.session is not None and self.session.authenticated:
            return False
        await self.push("530 5.7.0 Authentication required")
        return True

    async def _read_client_line(self) -> bytes:
        # An AUTH continuation line may be far longer than a command line (RFC 4954 section 4
        # exists for exactly that), so read past the StreamReader's limit in chunks.
        chunks: list[bytes] = []
        while True:
            try:
                chunks.append(await self._reader.readuntil(b"\n"))
                return b"".join(chunks)
            except asyncio.LimitOverrunError as error:
                chunks.append(await self._reader.read(error.consumed))

    async def auth_XOAUTH2(self, _: SMTP, args: list[str]) -> AuthResult:
        return await self._oauth2_exchange("XOAUTH2", args)

    async def auth_OAUTHBEARER(self, _: SMTP, args: list[str]) -> AuthResult:
        return await self._oauth2_exchange("OAUTHBEARER", args)

    async def _oauth2_exchange(self, mechanism: str, args: list[str]) -> AuthResult:
        on_auth_line = len(args) == 2
        if on_auth_line:
            blob = args[1].encode("ascii", "replace")
        else:
            await self.push("334 ")
            blob = (await self._read_client_line()).strip()
            if blob == b"*":
                await self.push("501 5.7.0 Authentication aborted")
                return AuthResult(success=False, handled=True)
        try:
            payload = base64.b64decode(blob, validate=True)
            credentials = PARSERS[mechanism](payload)
        except (binascii.Error, ValueError):
            credentials = None
        if credentials is None:
            await self.push(CANNOT_DECODE)
            return AuthResult(success=False, handled=True)
        user, token = credentials
        server = self._devserver
        scripted = server._pop_scripted("AUTH")
        if scripted is not None and not _is_success(scripted):
            # Answered instead of checking the token (e.g. a 454 while the check is down).
            server._record_auth(
                AuthAttempt(
                    user=user,
                    accepted=False,
                    initial_response_on_auth_line=on_auth_line,
                    temporary_failure=scripted.startswith("4"),
                    token=token,
                    mechanism=mechanism,
                    initial_response=payload,
                )
            )
            await self.push(scripted)
            return AuthResult(success=False, handled=True)
        accepted = await server._check_token(user, token, on_auth_line, mechanism, payload)
        if accepted is None:
            await self.push(TEMPORARY_FAILURE)
            return AuthResult(success=False, handled=True)
        if accepted:
            return AuthResult(success=True, message=ACCEPTED, auth_data=user)
        challenge = base64.b64encode(json.dumps(server.error_challenge(mechanism)).encode())
        await self.push(f"334 {challenge.decode()}")
        # Like Gmail and Dovecot, end the exchange whatever the client answers (it should
        # be an empty line for XOAUTH2, a base64 %x01 for OAUTHBEARER): record it.
        answer = await self._read_client_line()
        server._record_answer(token, answer.rstrip(b"\r\n"))
        for line in BAD_CREDENTIALS:
            await self.push(line)
        return AuthResult(success=False, handled=True)


class _Handler:
    """aiosmtpd's hooks; all state lives on the XOAuth2SMTPServer."""

    def __init__(self, server: XOAuth2SMTPServer) -> None:
        self.server = server

    async def handle_EHLO(
        self, smtp: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        # With this (5-argument) hook aiosmtpd leaves recording the client name to us.
        session.host_name = hostname
        if not self.server.pipelining:
            return responses
        # aiosmtpd reads one line at a time from a buffer, so pipelined commands just work.
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        scripted = await self.server._scripted("MAIL", smtp)
        if scripted is not None and not _is_success(scripted):
            return scripted
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return scripted or "250 2.1.0 OK"

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        rejection = self.server._rejection_for(address)
        if rejection is not None:
            return rejection
        scripted = await self.server._scripted("RCPT", smtp)
        if scripted is not None and not _is_success(scripted):
            return scripted
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        scripted = self.server._pop_scripted("DATA_END")
        if scripted is not None and scripted not in (DROP, HANG) and not _is_success(scripted):
            return scripted  # refused: not delivered
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            mail_options=list(envelope.mail_options),
            auth_user=str(session.auth_data or ""),
            received_at=datetime.datetime.now(datetime.UTC),
        )
        self.server._deliver(message)
        if scripted in (DROP, HANG):
            # Delivered, but the client never learns it: the undetermined window.
            await self.server._misbehave(scripted, smtp)
        after = self.server._pop_scripted("AFTER_MESSAGE")
        if after == DROP:
            # Close gracefully once this reply is written: between two messages.
            assert smtp.transport is not None
            asyncio.get_running_loop().call_soon(smtp.transport.close)
        return "250 2.0.0 OK"


class _SocketController(Controller):
    """Serves on a socket we bound ourselves, so port 0 yields a known port before start."""

    def __init__(
        self, handler: _Handler, sock: socket.socket, factory: Callable[[], SMTP], **kw: Any
    ) -> None:
        host, port = sock.getsockname()[:2]
        super().__init__(handler, hostname=host, port=port, **kw)
        self._sock = sock
        self._smtp_factory = factory

    def factory(self) -> SMTP:
        return self._smtp_factory()

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self._sock, ssl=self.ssl_context)


class XOAuth2SMTPServer:
    """A local SMTP server that accepts mail only after a valid AUTH XOAUTH2 or OAUTHBEARER.

    ``mechanisms`` are the ones it offers (both by default; ``("OAUTHBEARER",)`` acts like a
    Dovecot set to the standard mechanism only). ``openid_configuration`` is the metadata
    URL named in OAUTHBEARER's error challenge.

    ``validate_token(user, token)`` decides; it runs in a worker thread, and an exception
    from it is answered like an unreachable token service (454, temporary). ``security`` is
    ``"none"`` (AUTH over plain TCP), ``"starttls"`` (AUTH only after STARTTLS, like port
    587) or ``"tls"`` (implicit TLS, like port 465); without ``certfile``/``keyfile`` a
    throwaway self-signed pair is made and exposed as ``certfile`` for clients to trust.
    """

    def __init__(
        self,
        validate_token: Callable[[str, str], bool],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        security: Security = "none",
        certfile: str | None = None,
        keyfile: str | None = None,
        max_line_length: int = 1000,
        size_limit: int | None = None,
        smtputf8: bool = True,
        maildir: str | os.PathLike[str] | None = None,
        on_message: Callable[[ReceivedMessage], object] | None = None,
        temporary_auth_failure: bool = False,
        allow_non_loopback: bool = False,
        pipelining: bool = True,
        mechanisms: Sequence[str] = MECHANISMS,
        openid_configuration: str | None = None,
    ) -> None:
        check_loopback_host(host, allow_non_loopback=allow_non_loopback, what="SMTP server")
        if security not in ("none", "starttls", "tls"):
            raise ValueError(f"security must be 'none', 'starttls' or 'tls', not {security!r}")
        unknown = set(mechanisms) - set(MECHANISMS)
        if unknown:
            raise ValueError(f"mechanisms must be some of {MECHANISMS}, not {mechanisms!r}")
        if max_line_length < 100:
            raise ValueError("max_line_length below 100 octets would refuse ordinary commands")
        self.validate_token = validate_token
        self.host = host
        self._port = port
        self.security: Security = security
        self._certfile, self._keyfile = certfile, keyfile
        self.max_line_length = max_line_length
        self.size_limit = size_limit
        self.smtputf8 = smtputf8
        self.maildir = Path(maildir) if maildir is not None else None
        self.on_message = on_message
        # Plain attributes, read on every exchange, so a test may flip them mid-run.
        self.temporary_auth_failure = temporary_auth_failure
        self.reject_recipients: dict[str, str] = {}
        self.pipelining = pipelining
        # The SASL mechanisms offered (XOAUTH2 like Gmail, OAUTHBEARER like Dovecot).
        self.mechanisms = tuple(mechanisms)
        # The issuer metadata URL named in OAUTHBEARER's error challenge (RFC 7628 3.2.2).
        self.openid_configuration = openid_configuration
        # Fault injection: command -> replies to give, in order, instead of the normal one.
        # Commands: "AUTH" (answered instead of checking the token, e.g. "454 4.7.0 ..."),
        # "MAIL", "RCPT", "DATA_END" (the reply to the message itself) and
        # "AFTER_MESSAGE" (DROP closes the connection after a message was accepted).
        # A 2xx reply proceeds normally; DROP closes without answering; HANG never answers.
        self.scripted_replies: dict[str, list[str]] = {}
        self._condition = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._auth_attempts: list[AuthAttempt] = []
        self._controller: _SocketController | None = None
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._port

    @property
    def certfile(self) -> str | None:
        """The certificate a client should trust in the TLS modes (None for plain TCP)."""
        return self._certfile if self.security != "none" else None

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._condition:
            return list(self._messages)

    @property
    def auth_attempts(self) -> list[AuthAttempt]:
        with self._condition:
            return list(self._auth_attempts)

    def clear(self) -> None:
        """Forget recorded messages and authentication attempts."""
        with self._condition:
            self._messages.clear()
            self._auth_attempts.clear()

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Wait until at least ``count`` messages arrived; raise TimeoutError after ``timeout``."""
        with self._condition:
            if not self._condition.wait_for(lambda: len(self._messages) >= count, timeout):
                raise TimeoutError(
                    f"Expected {count} message(s) within {timeout} s, "
                    f"received {len(self._messages)}."
                )
            return list(self._messages)

    def start(self) -> XOAuth2SMTPServer:
        if self._controller is not None:
            raise RuntimeError("The SMTP server is already running.")
        tls_context = None
        if self.security != "none":
            if self._certfile is None or self._keyfile is None:
                self._tempdir = tempfile.TemporaryDirectory(prefix="xoauth2-smtp-tls-")
                self._certfile, self._keyfile = make_self_signed_certificate(self._tempdir.name)
            tls_context = server_ssl_context(self._certfile, self._keyfile)
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host.strip("[]"), self._port), family=family)
        self._port = sock.getsockname()[1]
        handler = _Handler(self)
        smtp_options: dict[str, Any] = {
            "data_size_limit": self.size_limit,
            "enable_SMTPUTF8": self.smtputf8,
            "hostname": "localhost",  # avoids a reverse DNS lookup per connection
            "ident": "ESMTP django_xoauth2_mail development server",
            "tls_context": tls_context if self.security == "starttls" else None,
            "require_starttls": self.security == "starttls",
            # Implicit TLS is invisible to aiosmtpd's check, which knows only STARTTLS.
            "auth_require_tls": self.security == "starttls",
            "auth_exclude_mechanism": [
                "PLAIN",
                "LOGIN",
                *(name for name in MECHANISMS if name not in self.mechanisms),
            ],
        }

        def factory() -> SMTP:
            return _XOAuth2Protocol(
                handler, max_line_length=self.max_line_length, server=self, **smtp_options
            )

        controller = _SocketController(
            handler, sock, factory, ssl_context=tls_context if self.security == "tls" else None
        )
        try:
            controller.start()
        except BaseException:
            sock.close()
            raise
        self._controller = controller
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None
            self._certfile = self._keyfile = None

    def __enter__(self) -> XOAuth2SMTPServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # Called from the server's event loop thread.

    def error_challenge(self, mechanism: str) -> dict[str, str]:
        """The JSON the server sends (base64) in its 334 after refusing a token."""
        if mechanism == "XOAUTH2":
            return dict(ERROR_CHALLENGE)
        challenge = dict(OAUTHBEARER_ERROR_CHALLENGE)
        if self.openid_configuration:
            challenge["openid-configuration"] = self.openid_configuration
        return challenge

    def _record_answer(self, token: str, answer: bytes) -> None:
        # Onto the newest attempt with this token: other connections may have tried since.
        with self._condition:
            for index in reversed(range(len(self._auth_attempts))):
                attempt = self._auth_attempts[index]
                if attempt.token == token and attempt.answer_to_challenge is None:
                    replaced = dataclasses.replace(attempt, answer_to_challenge=answer)
                    self._auth_attempts[index] = replaced
                    return

    async def _check_token(
        self,
        user: str,
        token: str,
        on_auth_line: bool,
        mechanism: str = "XOAUTH2",
        initial_response: bytes = b"",
    ) -> bool | None:
        """True/False for a valid/invalid token, None for a temporary failure."""
        accepted: bool | None = None
        if not self.temporary_auth_failure:
            try:
                # A validator may do I/O (an introspection call); keep the loop responsive.
                accepted = bool(await asyncio.to_thread(self.validate_token, user, token))
            except Exception:
                logger.exception("The XOAUTH2 token validator failed; answering 454.")
        attempt = AuthAttempt(
            user=user,
            accepted=bool(accepted),
            initial_response_on_auth_line=on_auth_line,
            temporary_failure=accepted is None,
            token=token,
            mechanism=mechanism,
            initial_response=initial_response,
        )
        self._record_auth(attempt)
        return accepted

    def _record_auth(self, attempt: AuthAttempt) -> None:
        with self._condition:
            self._auth_attempts.append(attempt)

    def _pop_scripted(self, command: str) -> str | None:
        with self._condition:
            replies = self.scripted_replies.get(command)
            return replies.pop(0) if replies else None

    async def _scripted(self, command: str, smtp: SMTP) -> str | None:
        reply = self._pop_scripted(command)
        if reply in (DROP, HANG):
            await self._misbehave(reply, smtp)
        return reply

    @staticmethod
    async def _misbehave(reply: str, smtp: SMTP) -> None:
        if reply == HANG:
            await asyncio.sleep(3600)  # cancelled when the server stops
        _abort(smtp)

    def _rejection_for(self, address: str) -> str | None:
        rejections = {key.lower(): value for key, value in self.reject_recipients.items()}
        return rejections.get(address.lower())

    def _deliver(self, message: ReceivedMessage) -> None:
        if self.maildir is not None:
            message = dataclasses.replace(message, eml_path=_write_eml(self.maildir, message.data))
        with self._condition:
            self._messages.append(message)
            self._condition.notify_all()
        if self.on_message is not None:
            try:
                self.on_message(message)
            except Exception:
                # A failing printer must not turn an accepted message into an SMTP error.
                logger.exception("on_message failed for a message from %s", message.mail_from)


def _write_eml(directory: Path, data: bytes) -> Path:
    """Write ``data`` to a new .eml file atomically: readers never see half a message."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%f")
    fd, temporary = tempfile.mkstemp(prefix=f".{stamp}-", suffix=".tmp", dir=directory)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    final = Path(temporary).with_name(Path(temporary).name[1:].removesuffix(".tmp") + ".eml")
    os.replace(temporary, final)
    return final


def _abort(smtp: SMTP) -> None:
    transport = smtp.transport
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    elif transport is not None:
        transport.close()


def _is_success(reply: str) -> bool:
    return reply.startswith("2")
