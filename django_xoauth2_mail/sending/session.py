"""The async SMTP session for one mailbox, on aiosmtplib.

``SMTPSession`` opens a connection (implicit TLS, STARTTLS, or plain for
local servers), authenticates with XOAUTH2 through aiosmtplib's
``oauth_token_generator``, and sends envelopes one by one, reporting for each
message whether it was delivered, refused (and to whom), or undetermined.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiosmtplib
from aiosmtplib.auth import auth_xoauth2_encode
from aiosmtplib.typing import Default
from django.views.decorators.debug import sensitive_variables

from django_xoauth2_mail.exceptions import SMTPAuthenticationFailed, SMTPConnectionFailed
from django_xoauth2_mail.providers.base import SMTPEndpoint, is_loopback
from django_xoauth2_mail.sending.diagnostics import explain_auth_failure
from django_xoauth2_mail.sending.messages import Envelope
from django_xoauth2_mail.sending.ratelimit import SlidingWindowLimiter
from django_xoauth2_mail.sending.transaction import (
    TRANSIENT_CODES,
    BeforeEndOfData,
    ConnectionLostBeforeData,
    TransactionResult,
    transact,
)

logger = logging.getLogger(__name__)

# RFC 5321 caps a command line at 512 octets; longer XOAUTH2 responses (Microsoft
# tokens run past 2 KB) go on their own line after the server's 334 (RFC 4954 §4).
MAX_AUTH_LINE = 512

# Called with the token the server just refused (or None): returns a token to try.
TokenSource = Callable[[str | None], Awaitable[str]]


class XOAuth2Refused(aiosmtplib.SMTPAuthenticationError):
    """An XOAUTH2 refusal, with the server's decoded JSON challenge when it sent one."""

    def __init__(self, code: int, message: str, challenge: dict[str, Any] | None) -> None:
        super().__init__(code, message)
        self.challenge = challenge


class XOAuth2Client(aiosmtplib.SMTP):
    """aiosmtplib's client with an XOAUTH2 exchange that keeps the server's
    error detail (aiosmtplib drops the 334 JSON) and sends long tokens after
    a 334 instead of on an over-long AUTH line."""

    @sensitive_variables()
    async def auth_xoauth2(
        self,
        username: str | bytes,
        access_token: str | bytes,
        /,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,
    ) -> aiosmtplib.SMTPResponse:
        await self._ehlo_or_helo_if_needed()
        initial_response = auth_xoauth2_encode(username, access_token)
        if len(b"AUTH XOAUTH2 " + initial_response + b"\r\n") <= MAX_AUTH_LINE:
            response = await self.execute_command(
                b"AUTH", b"XOAUTH2", initial_response, timeout=timeout
            )
        else:
            response = await self.execute_command(b"AUTH", b"XOAUTH2", timeout=timeout)
            if response.code != 334:
                raise XOAuth2Refused(response.code, response.message, None)
            response = await self.execute_command(initial_response, timeout=timeout)
        challenge = None
        if response.code == 334:
            # The server explains the refusal in a base64 JSON challenge and
            # waits for an empty line before its final reply.
            challenge = decode_challenge(response.message)
            response = await self.execute_command(b"", timeout=timeout)
        if response.code != 235:
            raise XOAuth2Refused(response.code, response.message, challenge)
        return response


def tls_context_for(ca_file: str | None) -> ssl.SSLContext:
    """A verifying TLS context, shared by every connection that trusts the same CAs.

    Building one loads the whole CA bundle (about 20 ms), which would otherwise
    be paid by every new connection, on the loop every session shares.
    """
    mtime = os.path.getmtime(ca_file) if ca_file else None
    return _tls_context(ca_file, mtime)


@functools.lru_cache(maxsize=16)
def _tls_context(ca_file: str | None, mtime: float | None) -> ssl.SSLContext:
    # ``mtime`` is part of the key: a replaced CA file is read again.
    return ssl.create_default_context(cafile=ca_file)


def decode_challenge(message: str) -> dict[str, Any] | None:
    try:
        decoded = json.loads(base64.b64decode(message.strip(), validate=True))
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) else None


@dataclass
class DeliveryResult:
    delivered: bool = False
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    error: str | None = None
    undetermined: bool = False
    # Not delivered, for reasons that may pass (4xx): the outbox tries again later.
    transient: bool = False


class SMTPSession:
    """One authenticated SMTP connection for one mailbox."""

    def __init__(
        self,
        endpoint: SMTPEndpoint,
        username: str,
        token_source: TokenSource,
        *,
        timeout: float,
        local_hostname: str,
        allow_insecure: bool = False,
        retry_delays: Sequence[float] = (),
        limiter: SlidingWindowLimiter | None = None,
    ) -> None:
        if endpoint.security == "none" and not (allow_insecure or is_loopback(endpoint.host)):
            raise SMTPConnectionFailed(
                f"SMTP_SECURITY 'none' would send {username}'s access token in clear to "
                f"{endpoint.host}; it is allowed for loopback hosts only. Use 'tls' or "
                "'starttls', or set XOAUTH2_MAIL['ALLOW_INSECURE_SMTP'] = True.",
                mailbox=username,
            )
        self.endpoint = endpoint
        self.username = username
        self.token_source = token_source
        self.timeout = timeout
        self.local_hostname = local_hostname
        self.retry_delays = tuple(retry_delays)
        self.limiter = limiter
        # One transaction at a time: a kept-alive session is shared by calls.
        self.lock = asyncio.Lock()
        self.client: XOAuth2Client | None = None

    @property
    def is_open(self) -> bool:
        return self.client is not None and self.client.is_connected

    def _new_client(self, token_generator: Callable[[], Awaitable[str]]) -> XOAuth2Client:
        endpoint = self.endpoint
        tls_context = None
        if endpoint.security != "none":
            tls_context = tls_context_for(endpoint.ca_file)
        return XOAuth2Client(
            hostname=endpoint.host,
            port=endpoint.port,
            use_tls=endpoint.security == "tls",
            start_tls=endpoint.security == "starttls",
            tls_context=tls_context,
            timeout=self.timeout,
            local_hostname=self.local_hostname,
            username=self.username,
            oauth_token_generator=token_generator,
        )

    @sensitive_variables()
    async def open(self) -> None:
        """Connect and authenticate; a refused token is refreshed and retried once."""
        rejected: str | None = None
        for attempt in (1, 2):
            tried: list[str] = []

            @sensitive_variables()
            async def generate_token(
                rejected: str | None = rejected, tried: list[str] = tried
            ) -> str:
                token = await self.token_source(rejected)
                tried.append(token)
                return token

            client = self._new_client(generate_token)
            try:
                await client.connect()
            except XOAuth2Refused as exc:
                if exc.code == 535 and attempt == 1 and tried:
                    logger.info("SMTP refused the token of %s; refreshing it", self.username)
                    rejected = tried[0]
                    continue
                raise self._auth_error(exc) from None
            except (aiosmtplib.SMTPException, OSError) as exc:
                raise self._connection_error(exc) from None
            self.client = client
            return

    def _auth_error(self, exc: XOAuth2Refused) -> SMTPAuthenticationFailed:
        return SMTPAuthenticationFailed(
            explain_auth_failure(
                self.username, self.endpoint, exc.code, exc.message, exc.challenge
            ),
            mailbox=self.username,
            smtp_code=exc.code,
            smtp_error=exc.message,
        )

    def _connection_error(self, exc: BaseException) -> SMTPConnectionFailed:
        endpoint = self.endpoint
        reason = str(exc) or type(exc).__name__
        hint = ""
        if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in reason:
            hint = (
                " The server's certificate is not trusted: for a private CA set SMTP_CA_FILE "
                "in the provider's settings."
            )
        return SMTPConnectionFailed(
            f"Could not connect to the SMTP server {endpoint.host}:{endpoint.port} "
            f"({endpoint.security}) for {self.username}: {reason}.{hint}",
            mailbox=self.username,
        )

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is None or not client.is_connected:
            return
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError):
            client.close()

    async def send(
        self, envelope: Envelope, before_end_of_data: BeforeEndOfData | None = None
    ) -> DeliveryResult:
        """Send one message, retrying what the server refused for now.

        Temporary refusals (421, 450, 451, 452, 454) of the message or of some
        recipients are retried after ``retry_delays``; a connection found dead
        before any message data went out is reopened and the message sent again.
        A message whose end of DATA got no reply is never sent again.
        """
        result = DeliveryResult()
        pending = list(envelope.recipients)
        delays = iter(self.retry_delays)
        if self.limiter is not None:
            await self.limiter.wait()
        async with self.lock:
            while True:
                attempt = await self._attempt(envelope, pending, before_end_of_data)
                result.refused.update(attempt.refused)
                result.delivered = result.delivered or bool(attempt.delivered_to)
                if attempt.undetermined:
                    result.undetermined, result.error = True, attempt.error
                    return result
                retry = [r for r, (code, _) in attempt.refused.items() if code in TRANSIENT_CODES]
                if attempt.transient and not attempt.delivered_to:
                    permanent = set(attempt.refused) - set(retry)
                    retry = [r for r in pending if r not in permanent]
                delay = next(delays, None) if retry else None
                if delay is None:
                    if not result.delivered:
                        result.error = attempt.error or "every recipient was refused"
                        result.transient = attempt.transient or bool(retry)
                    return result
                logger.info(
                    "Temporary SMTP refusal for %s (%s); retrying in %.1f s",
                    self.username,
                    attempt.error or "some recipients",
                    delay,
                )
                await asyncio.sleep(delay)
                for recipient in retry:
                    result.refused.pop(recipient, None)
                pending = retry

    async def _attempt(
        self,
        envelope: Envelope,
        recipients: list[str],
        before_end_of_data: BeforeEndOfData | None = None,
    ) -> TransactionResult:
        for reconnect in (False, True):
            if reconnect or not self.is_open:
                await self.close()
                await self.open()
            try:
                return await self._transact(envelope, recipients, before_end_of_data)
            except ConnectionLostBeforeData as exc:
                if reconnect:
                    return TransactionResult(
                        error=f"the SMTP connection was lost: {exc}", transient=True
                    )
                logger.info("SMTP connection of %s was lost; reconnecting", self.username)
        raise AssertionError("unreachable")

    async def _transact(
        self,
        envelope: Envelope,
        recipients: list[str],
        before_end_of_data: BeforeEndOfData | None = None,
    ) -> TransactionResult:
        client = self.client
        assert client is not None
        options = self._mail_options(client, envelope)
        if isinstance(options, str):
            return TransactionResult(error=options)
        try:
            return await transact(
                client,
                envelope.sender,
                recipients,
                envelope.data,
                options=options,
                encoding="utf-8" if envelope.smtputf8 else "ascii",
                timeout=self.timeout,
                before_end_of_data=before_end_of_data,
            )
        except aiosmtplib.SMTPException as exc:  # e.g. a reply that is not SMTP
            client.close()
            return TransactionResult(error=f"the SMTP exchange failed: {exc}")

    def _mail_options(self, client: XOAuth2Client, envelope: Envelope) -> list[str] | str:
        """MAIL FROM parameters, or why the message cannot go to this server."""
        options: list[str] = []
        if client.supports_extension("size"):
            limit = client.esmtp_extensions.get("size", "")
            if limit.isdigit() and int(limit) and len(envelope.data) > int(limit):
                return (
                    f"the message is {len(envelope.data)} bytes and the server accepts "
                    f"at most {limit}"
                )
            options.append(f"SIZE={len(envelope.data)}")
        if envelope.smtputf8:
            if not client.supports_extension("smtputf8"):
                return (
                    "an address has a non-ASCII local part and the server does not offer SMTPUTF8"
                )
            options.append("SMTPUTF8")
        return options
