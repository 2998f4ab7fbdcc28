"""The async SMTP session for one mailbox, on aiosmtplib.

``SMTPSession`` opens a connection (implicit TLS, STARTTLS, or plain for
local servers), authenticates with XOAUTH2 through aiosmtplib's
``oauth_token_generator``, and sends envelopes one by one, reporting for each
message whether it was delivered, refused (and to whom), or undetermined.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import aiosmtplib
from aiosmtplib.typing import Default
from django.views.decorators.debug import sensitive_variables

from django_xoauth2_mail.exceptions import (
    ConfigurationError,
    SMTPAuthenticationFailed,
    SMTPConnectionFailed,
    XOAuth2MailError,
)
from django_xoauth2_mail.providers.base import SMTPEndpoint, is_loopback
from django_xoauth2_mail.providers.scrub import scrub
from django_xoauth2_mail.sending.diagnostics import explain_auth_failure
from django_xoauth2_mail.sending.limits import MailboxLimits, SessionLease
from django_xoauth2_mail.sending.messages import Envelope
from django_xoauth2_mail.sending.ratelimit import SlidingWindowLimiter
from django_xoauth2_mail.sending.sasl import (
    MECHANISMS,
    Mechanism,
    SASLRefused,
    authenticate,
    choose_mechanism,
    initial_response,
)
from django_xoauth2_mail.sending.transaction import (
    TRANSIENT_CODES,
    BeforeEndOfData,
    ConnectionLostBeforeData,
    ServerStalled,
    TransactionResult,
    transact,
)

logger = logging.getLogger(__name__)

# Called with the token the server just refused (or None): returns a token to try.
TokenSource = Callable[[str | None], Awaitable[str]]


# The refusal of either mechanism (the name predates OAUTHBEARER).
XOAuth2Refused = SASLRefused


class XOAuth2Client(aiosmtplib.SMTP):
    """aiosmtplib's client, logging in with the OAuth2 mechanism the settings and the
    server allow (aiosmtplib knows only XOAUTH2), keeping the server's error detail
    and sending long tokens after a 334 instead of on an over-long AUTH line."""

    sasl_mechanism: str = "auto"  # the provider's SASL_MECHANISM setting
    mechanism_used: Mechanism | None = None

    async def _maybe_login_on_connect(self) -> None:
        if self._oauth_token_generator is None or self._login_username is None:
            await super()._maybe_login_on_connect()
            return
        await self._ehlo_or_helo_if_needed()
        mechanism = choose_mechanism(self.sasl_mechanism, self.server_auth_methods)
        token = await self._oauth_token_generator()
        await self.auth_oauth2(mechanism, self._login_username, token)

    @sensitive_variables()
    async def auth_oauth2(
        self,
        mechanism: Mechanism,
        username: str | bytes,
        access_token: str | bytes,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,
    ) -> aiosmtplib.SMTPResponse:
        await self._ehlo_or_helo_if_needed()
        self.mechanism_used = mechanism
        user = username.decode() if isinstance(username, bytes) else username
        token = access_token.decode() if isinstance(access_token, bytes) else access_token
        return await authenticate(self, mechanism, user, token, timeout=timeout)

    @sensitive_variables()
    async def auth_xoauth2(
        self,
        username: str | bytes,
        access_token: str | bytes,
        /,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,
    ) -> aiosmtplib.SMTPResponse:
        return await self.auth_oauth2("XOAUTH2", username, access_token, timeout=timeout)


def tls_flags(security: str) -> tuple[bool, bool]:
    """aiosmtplib's (use_tls, start_tls) for a security mode.

    Each mode is spelt out and anything else refused: a mode that matched neither
    ``"tls"`` nor ``"starttls"`` once meant a connection without TLS.
    """
    if security == "tls":
        return True, False
    if security == "starttls":
        return False, True
    if security == "none":
        return False, False
    raise ConfigurationError(
        f"SMTP security {security!r} is not 'tls', 'starttls' or 'none'; nothing was sent."
    )


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


@dataclass
class DeliveryResult:
    delivered: bool = False
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    error: str | None = None
    undetermined: bool = False
    # The server stopped answering: nothing more goes to it within this call.
    stalled: bool = False
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
        limits: MailboxLimits | None = None,
        limit_wait: float = 0.0,
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
        # The mailbox's limits shared across processes (sending/limits.py); the
        # session holds a slot from open() to close().
        self.limits = limits
        self.limit_wait = limit_wait
        self.lease: SessionLease | None = None
        # One transaction at a time: a kept-alive session is shared by calls.
        self.lock = asyncio.Lock()
        self.client: XOAuth2Client | None = None
        # Set by the dispatcher for a session kept open since an earlier call: its
        # connection may have died unnoticed while idle (see _attempt).
        self.kept_from_earlier = False

    @property
    def is_open(self) -> bool:
        return self.client is not None and self.client.is_connected

    @property
    def sasl_mechanism(self) -> str | None:
        """The mechanism the open connection logged in with."""
        return self.client.mechanism_used if self.client is not None else None

    def _new_client(self, token_generator: Callable[[], Awaitable[str]]) -> XOAuth2Client:
        endpoint = self.endpoint
        use_tls, start_tls = tls_flags(endpoint.security)
        tls_context = None
        if use_tls or start_tls:
            tls_context = tls_context_for(endpoint.ca_file)
        client = XOAuth2Client(
            hostname=endpoint.host,
            port=endpoint.port,
            use_tls=use_tls,
            start_tls=start_tls,
            tls_context=tls_context,
            timeout=self.timeout,
            local_hostname=self.local_hostname,
            username=self.username,
            oauth_token_generator=token_generator,
        )
        client.sasl_mechanism = endpoint.sasl_mechanism
        return client

    async def open(self) -> None:
        """Take a session slot of the mailbox (when it has MAX_SESSIONS), then log in."""
        if self.limits is not None and self.lease is None:
            self.lease = await self.limits.take_session(self.limit_wait)
        try:
            await self._login()
        except BaseException:
            await self._release_slot()
            raise

    @sensitive_variables()
    async def _login(self) -> None:
        """Connect and authenticate.

        A refused token (535) is refreshed and tried once more. A temporary
        refusal (454 4.7.0: the server cannot check tokens right now, or another
        of TRANSIENT_CODES) is no verdict on the token: the same token is tried
        again after each of ``retry_delays``, with no refresh.
        """
        rejected: str | None = None
        refreshed = False
        delays = iter(self.retry_delays)
        temporary_refusals = 0
        sent: list[str] = []  # every token tried: a reply may echo one (see _auth_error)
        while True:
            tried: list[str] = []

            @sensitive_variables()
            async def generate_token(
                rejected: str | None = rejected, tried: list[str] = tried
            ) -> str:
                token = await self.token_source(rejected)
                tried.append(token)
                sent.append(token)
                return token

            client = self._new_client(generate_token)
            try:
                await client.connect()
            except XOAuth2Refused as exc:
                client.close()
                if exc.code in TRANSIENT_CODES:
                    temporary_refusals += 1
                    delay = next(delays, None)
                    if delay is None:
                        raise self._auth_error(exc, refreshed, temporary_refusals, sent) from None
                    logger.warning(
                        "SMTP server %s could not check the token of %s (%d %s); "
                        "trying again in %.1f s",
                        self.endpoint.host,
                        self.username,
                        exc.code,
                        scrub(exc.message, self._spelled(sent)),
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                if exc.code == 535 and not refreshed and tried:
                    logger.info("SMTP refused the token of %s; refreshing it", self.username)
                    rejected, refreshed = tried[0], True
                    continue
                raise self._auth_error(exc, refreshed, temporary_refusals, sent) from None
            except XOAuth2MailError:
                # From the token source (e.g. MailboxReconnectRequired): already the
                # user-facing error. Checked before OSError, which some of them are.
                raise
            except (aiosmtplib.SMTPException, OSError) as exc:
                raise self._connection_error(exc) from None
            self.client = client
            return

    @sensitive_variables()
    def _auth_error(
        self, exc: XOAuth2Refused, refreshed: bool, temporary_refusals: int, sent: list[str]
    ) -> SMTPAuthenticationFailed:
        # A server (or a proxy) may quote the AUTH line it refused, token included.
        secrets = self._spelled(sent)
        reply = scrub(exc.message, secrets)
        text = explain_auth_failure(
            self.username,
            self.endpoint,
            exc.code,
            reply,
            exc.challenge,
            mechanism=exc.mechanism,
            refreshed=refreshed,
            temporary_refusals=temporary_refusals,
        )
        return SMTPAuthenticationFailed(
            scrub(text, secrets), mailbox=self.username, smtp_code=exc.code, smtp_error=reply
        )

    @sensitive_variables()
    def _spelled(self, tokens: list[str]) -> list[str]:
        """The tokens, and the initial responses (base64) that carried them, in either
        mechanism."""
        host, port = self.endpoint.host, self.endpoint.port
        return [
            *tokens,
            *(
                initial_response(mechanism, self.username, token, host, port).decode("ascii")
                for token in tokens
                for mechanism in MECHANISMS
            ),
        ]

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

    async def reserve(self) -> bool:
        """Take a session slot now if one is free, without waiting (an extra session)."""
        if self.limits is not None and self.lease is None and not self.is_open:
            self.lease = await self.limits.take_session(None)
            return self.lease is not None or not self.limits.max_sessions
        return True

    async def close(self) -> None:
        client, self.client = self.client, None
        try:
            if client is None or not client.is_connected:
                return
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()
        finally:
            await self._release_slot()

    async def _release_slot(self) -> None:
        lease, self.lease = self.lease, None
        if lease is not None:
            await lease.release()

    async def send(
        self, envelope: Envelope, before_end_of_data: BeforeEndOfData | None = None
    ) -> DeliveryResult:
        """Send one message within the mailbox's shared RATE_LIMIT (see ``_send``).

        ``before_end_of_data`` (the outbox's check-in) is awaited once the server
        waits for the message data; False withdraws the message unsent.
        """
        permit = None
        if self.limits is not None:
            permit = await self.limits.take_permit(self.limit_wait)
        try:
            return await self._send(envelope, before_end_of_data)
        finally:
            if permit is not None:
                await permit.done()

    async def _send(
        self, envelope: Envelope, before_end_of_data: BeforeEndOfData | None = None
    ) -> DeliveryResult:
        """Send one message, retrying what the server refused for now.

        Temporary refusals (421, 450, 451, 452, 454) of the message or of some
        recipients are retried after ``retry_delays``; a connection found dead
        before any message data went out is reopened and the message sent again.
        A message whose end of DATA got no reply is never sent again, nor is one
        the server stalled on (see _attempt).
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
                if attempt.undetermined or attempt.stalled:
                    result.undetermined, result.stalled = attempt.undetermined, attempt.stalled
                    result.error = attempt.error
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
        """One transaction, on a new connection if the one held turns out dead.

        A server that stops answering is not tried again: another wait of
        ``timeout`` would most likely end the same way. The one exception is the
        first transaction on a connection kept open since an earlier call (a NAT
        or firewall may have dropped it while it idled): it gets one new connection.
        """
        for reconnect in (False, True):
            # A session whose slot (MAX_SESSIONS) was lost must not go on: reopen takes one.
            reopen = reconnect or not self.is_open or bool(self.lease and not self.lease.usable)
            may_be_stale, self.kept_from_earlier = self.kept_from_earlier and not reopen, False
            if reopen:
                await self.close()
                await self.open()
            try:
                return await self._transact(envelope, recipients, before_end_of_data)
            except ServerStalled as exc:
                if not may_be_stale:
                    return TransactionResult(
                        error=f"{exc}; the message was not delivered", stalled=True
                    )
                logger.info("SMTP connection of %s went silent; reconnecting", self.username)
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
