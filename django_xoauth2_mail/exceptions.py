"""Every error this package raises derives from :class:`XOAuth2MailError`.

Leaves also inherit the standard exception they resemble, so code written for
Django's SMTP backend (``except smtplib.SMTPException``) keeps working, and
configuration errors derive from ``ImproperlyConfigured`` so ``fail_silently``
never hides them.
"""

from __future__ import annotations

import smtplib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured


class XOAuth2MailError(Exception):
    """Base class. ``mailbox`` is the address concerned, when there is one."""

    def __init__(self, message: str, *, mailbox: str | None = None) -> None:
        super().__init__(message)
        self.mailbox = mailbox


class ConfigurationError(XOAuth2MailError, ImproperlyConfigured):
    """The ``XOAUTH2_MAIL`` settings or the backend options are wrong."""


class EncryptionKeyError(ConfigurationError):
    """A stored token cannot be decrypted with the configured keys."""


class MailboxNotFound(ConfigurationError, LookupError):
    """No connected Mailbox matches the message's sender."""


class InvalidMessage(XOAuth2MailError, ValueError):
    """A message cannot be sent as given (bad address, header injection, ...)."""

    def __init__(self, message: str, *, index: int) -> None:
        super().__init__(message)
        self.index = index


class MailboxReconnectRequired(XOAuth2MailError):
    """The provider refused the stored grant for good: a person must consent again."""

    def __init__(self, mailbox: str, detail: str = "") -> None:
        reason = f" The provider said: {detail.rstrip('.')}." if detail else ""
        super().__init__(
            f"The mailbox {mailbox} must be reconnected: its OAuth2 consent was revoked "
            f"or has expired.{reason} Fix it with `python manage.py connect_mailbox "
            f"<provider> --email {mailbox}` or with the Reconnect button in the Django admin "
            "(XOAUTH2 mail > Mailboxes).",
            mailbox=mailbox,
        )
        self.detail = detail


class MailboxDisconnected(XOAuth2MailError):
    """The mailbox was disconnected on purpose (its tokens were wiped)."""

    def __init__(self, mailbox: str) -> None:
        super().__init__(
            f"The mailbox {mailbox} is disconnected. Connect it again with "
            f"`python manage.py connect_mailbox <provider> --email {mailbox}` or in the "
            "Django admin before sending from it.",
            mailbox=mailbox,
        )


class TokenRefreshError(XOAuth2MailError):
    """The token endpoint could not be reached or gave an unusable answer.

    Temporary by nature (outage, timeout, garbage): the mailbox is not flagged,
    and sending again later may succeed.
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

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the keyword-only details when pickled (e.g. across a process pool).
        return (_rebuild, (type(self), self.args[0], self.__dict__))


class SMTPAuthenticationFailed(SendError):
    """The SMTP server refused the access token (after one refresh and retry)."""


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


def _rebuild(cls: type[SendError], message: str, state: dict[str, Any]) -> SendError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error
