"""The async SMTP session for one mailbox, on aiosmtplib.

``SMTPSession`` opens a connection (implicit TLS, STARTTLS, or plain for
local servers), authenticates with XOAUTH2 through aiosmtplib's
``oauth_token_generator``, and sends envelopes one by one, reporting for each
message whether it was delivered, refused (and to whom), or undetermined.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiosmtplib
from aiosmtplib.auth import auth_xoauth2_encode
from aiosmtplib.typing import Default

from django_xoauth2_mail.exceptions import SMTPAuthenticationFailed, SMTPConnectionFailed
from django_xoauth2_mail.messages import Envelope
from django_xoauth2_mail.providers.base import SMTPEndpoint

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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        self.client: XOAuth2Client | None = None

    @property
    def is_open(self) -> bool:
        return self.client is not None and self.client.is_connected

    def _new_client(self, token_generator: Callable[[], Awaitable[str]]) -> XOAuth2Client:
        endpoint = self.endpoint
        tls_context = None
        if endpoint.security != "none":
            tls_context = ssl.create_default_context(cafile=endpoint.ca_file)
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

    async def open(self) -> None:
        """Connect and authenticate; a refused token is refreshed and retried once."""
        rejected: str | None = None
        for attempt in (1, 2):
            tried: list[str] = []

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
        from django_xoauth2_mail.diagnostics import explain_auth_failure

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

    async def send(self, envelope: Envelope) -> DeliveryResult:
        """Send one message; reconnect once if the connection was found dead
        before the server accepted anything for it."""
        if not self.is_open:
            await self.open()
        try:
            return await self._transact(envelope)
        except _ConnectionLostBeforeData:
            logger.info("SMTP connection of %s was lost; reconnecting", self.username)
            await self.close()
            await self.open()
            try:
                return await self._transact(envelope)
            except _ConnectionLostBeforeData as exc:
                return DeliveryResult(error=f"the SMTP connection was lost: {exc}")

    async def _transact(self, envelope: Envelope) -> DeliveryResult:
        client = self.client
        assert client is not None
        options = self._mail_options(client, envelope)
        if isinstance(options, DeliveryResult):
            return options
        encoding = "utf-8" if envelope.smtputf8 else "ascii"
        try:
            await client.mail(envelope.sender, options=options, encoding=encoding)
            refused = await self._recipients(client, envelope.recipients, encoding)
        except aiosmtplib.SMTPServerDisconnected as exc:
            raise _ConnectionLostBeforeData(str(exc)) from None
        except aiosmtplib.SMTPResponseException as exc:
            await self._reset(client)
            return DeliveryResult(error=f"the server refused the sender: {exc.code} {exc.message}")
        if len(refused) == len(envelope.recipients):
            await self._reset(client)
            return DeliveryResult(refused=refused, error="the server refused every recipient")
        try:
            await client.data(envelope.data)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            # The message may have reached the server: never re-send it blindly.
            return DeliveryResult(
                refused=refused, undetermined=True, error=f"no reply to the end of DATA: {exc}"
            )
        except aiosmtplib.SMTPResponseException as exc:
            await self._reset(client)
            return DeliveryResult(
                refused=refused, error=f"the server refused the message: {exc.code} {exc.message}"
            )
        return DeliveryResult(delivered=True, refused=refused)

    def _mail_options(
        self, client: XOAuth2Client, envelope: Envelope
    ) -> list[str] | DeliveryResult:
        options: list[str] = []
        if client.supports_extension("size"):
            limit = client.esmtp_extensions.get("size", "")
            if limit.isdigit() and int(limit) and len(envelope.data) > int(limit):
                return DeliveryResult(
                    error=f"the message is {len(envelope.data)} bytes and the server accepts "
                    f"at most {limit}"
                )
            options.append(f"SIZE={len(envelope.data)}")
        if envelope.smtputf8:
            if not client.supports_extension("smtputf8"):
                return DeliveryResult(
                    error="an address has a non-ASCII local part and the server does not "
                    "offer SMTPUTF8"
                )
            options.append("SMTPUTF8")
        return options

    @staticmethod
    async def _recipients(
        client: XOAuth2Client, recipients: Sequence[str], encoding: str
    ) -> dict[str, tuple[int, str]]:
        refused: dict[str, tuple[int, str]] = {}
        for recipient in recipients:
            try:
                await client.rcpt(recipient, encoding=encoding)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused[recipient] = (exc.code, exc.message)
        return refused

    @staticmethod
    async def _reset(client: XOAuth2Client) -> None:
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, OSError):
            client.close()


class _ConnectionLostBeforeData(Exception):
    """The connection died before the server accepted any part of a message."""
