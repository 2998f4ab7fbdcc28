"""Every error this package raises derives from :class:`XOAuth2MailError`.

Leaves also inherit the exception Django's SMTP backend raised in the same
situation, so code written for it keeps working: a revoked grant stands where
a refused password stood (``smtplib.SMTPAuthenticationError``), a token
endpoint outage or a disconnected mailbox where a lost connection stood
(``smtplib.SMTPServerDisconnected``, hence ``OSError``, which is what
``socket.error`` names), and configuration errors derive from
``ImproperlyConfigured`` so ``fail_silently`` never hides them.
docs/backend.rst ("The error hierarchy") has the table.
"""

from __future__ import annotations

import smtplib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured


class XOAuth2MailError(Exception):
    """Base class. ``mailbox`` is the address concerned, when there is one.

    ``str(error)`` is always the actionable message, whatever standard
    exception a leaf also derives from.
    """

    def __init__(self, message: str, *, mailbox: str | None = None) -> None:
        # Exception's own __init__, not super(): smtplib's response exceptions,
        # next in some leaves' MRO, take (code, message) and would make
        # str(error) a tuple. Leaves set smtp_code / smtp_error themselves.
        Exception.__init__(self, message)
        self.mailbox = mailbox

    def __reduce__(self) -> tuple[Any, ...]:
        # Leaves take other constructor arguments than args[0] (and keyword-only
        # details): rebuild from the message and the attributes, e.g. when an
        # error crosses a process pool or a task queue.
        return (_rebuild, (type(self), self.args[0], self.__dict__))


class ConfigurationError(XOAuth2MailError, ImproperlyConfigured):
    """The ``XOAUTH2_MAIL`` settings or the backend options are wrong."""


class EncryptionKeyError(ConfigurationError):
    """A stored token cannot be decrypted with the configured keys."""


class MailboxNotFound(XOAuth2MailError, smtplib.SMTPSenderRefused, LookupError):
    """No Mailbox can send from the message's sender.

    It stands where Django's SMTP backend raised ``SMTPSenderRefused`` (a server
    refusing the From address): a failure of that message, which
    ``fail_silently`` suppresses and queue clients (django-mailer) defer.
    """

    def __init__(self, message: str, *, mailbox: str | None = None) -> None:
        # Not super(): SMTPSenderRefused.__init__ takes (code, msg, sender) and would
        # make str(error) a tuple; the message stays the one actionable sentence.
        Exception.__init__(self, message)
        self.mailbox = mailbox
        # SMTPSenderRefused's attributes, for code that reads them.
        self.smtp_code = 550
        self.smtp_error = message.encode()
        self.sender = mailbox or ""


class InvalidMessage(XOAuth2MailError, ValueError):
    """A message cannot be sent as given (bad address, header injection, ...)."""

    def __init__(self, message: str, *, index: int) -> None:
        super().__init__(message)
        self.index = index


class MailboxReconnectRequired(XOAuth2MailError, smtplib.SMTPAuthenticationError):
    """The provider refused the stored grant for good: a person must consent again.

    Where Django's SMTP backend met a password that no longer works, it raised
    ``SMTPAuthenticationError`` (a 535 from the server): so does this, with
    ``smtp_code`` 535 (RFC 4954: credentials invalid) and ``smtp_error`` the
    same actionable text as ``str(error)``.
    """

    def __init__(self, mailbox: str, detail: str = "", *, provider: str | None = None) -> None:
        reason = f" The provider said: {detail.rstrip('.')}." if detail else ""
        super().__init__(
            f"The mailbox {mailbox} must be reconnected: its OAuth2 consent was revoked "
            f"or has expired.{reason} Fix it with `{connect_command(mailbox, provider)}` or "
            "with the Reconnect button in the Django admin (XOAUTH2 mail > Mailboxes).",
            mailbox=mailbox,
        )
        self.detail = detail
        self.smtp_code = 535
        self.smtp_error = str(self)


class MailboxDisconnected(XOAuth2MailError, smtplib.SMTPServerDisconnected):
    """The mailbox was disconnected on purpose (its tokens were wiped).

    Nothing can be sent from it until someone connects it again: the
    situation of a backend that has no connection, which Django's SMTP
    backend reported as ``SMTPServerDisconnected`` (an ``OSError``).
    """

    def __init__(self, mailbox: str, *, provider: str | None = None) -> None:
        super().__init__(
            f"The mailbox {mailbox} is disconnected. Connect it again with "
            f"`{connect_command(mailbox, provider)}` or in the Django admin before sending "
            "from it.",
            mailbox=mailbox,
        )


def connect_command(mailbox: str, provider: str | None) -> str:
    """The exact command that (re)connects ``mailbox``, as a person would type it."""
    return f"python manage.py connect_mailbox {provider or '<provider>'} --email {mailbox}"


class TokenRefreshError(XOAuth2MailError, smtplib.SMTPServerDisconnected):
    """The token endpoint could not be reached or gave an unusable answer.

    Temporary by nature (outage, timeout, garbage): the mailbox is not flagged,
    and sending again later may succeed. Logging in needs the token endpoint as
    much as the SMTP server, so this stands where Django's SMTP backend raised
    a connection failure: ``SMTPServerDisconnected``, an ``SMTPException`` and
    an ``OSError`` (``socket.error``), which queues such as django-mailer defer.
    """


@dataclass(frozen=True)
class MessageFailure:
    """Why one message of a batch was not (or not surely) delivered."""

    index: int  # position in the list given to send_messages()
    error: str
    refused_recipients: dict[str, tuple[int, str]]
    undetermined: bool = False  # the server may have accepted it; not re-sent


class SendError(XOAuth2MailError, smtplib.SMTPException):
    """Some messages of a ``send_messages()`` call were not delivered.

    ``sent`` counts the delivered ones; ``failures`` says what happened to each
    of the others. Messages that failed were not retried beyond the backend's
    bounded retries, and none were dropped silently.
    """

    def __init__(
        self,
        message: str,
        *,
        mailbox: str | None = None,
        sent: int = 0,
        failures: Sequence[MessageFailure] = (),
        smtp_code: int | None = None,
        smtp_error: str | None = None,
    ) -> None:
        super().__init__(message, mailbox=mailbox)
        self.sent = sent
        self.failures = list(failures)
        self.smtp_code = smtp_code
        self.smtp_error = smtp_error


# SendError's smtp_code may be None; this leaf always carries the server's code.
class SMTPAuthenticationFailed(SendError, smtplib.SMTPAuthenticationError):  # type: ignore[misc]
    """The SMTP server refused the access token (after one refresh and retry),
    or could not check it (454) after the bounded retries.

    Also an ``smtplib.SMTPAuthenticationError``, as Django's SMTP backend raised
    for a refused login; ``smtp_code`` and ``smtp_error`` are the server's reply.
    """


class SMTPConnectionFailed(SendError):
    """The SMTP server could not be reached, or the TLS handshake failed."""


class SendingLimitReached(SendError):
    """A mailbox's shared limit (``MAX_SESSIONS`` or ``RATE_LIMIT``) left no room
    within ``LIMIT_WAIT``. Temporary: nothing was sent past it; try again later.
    ``retry_after``: seconds until room is expected, when known (a task queue can
    defer the message that long rather than count it as a failed attempt)."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


def _rebuild(cls: type[XOAuth2MailError], message: str, state: dict[str, Any]) -> XOAuth2MailError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error
