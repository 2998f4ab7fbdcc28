"""Django ``EmailMessage`` -> SMTP envelope and the exact bytes to send.

The bytes follow the running Django's own SMTP backend, so a message looks
the same on the wire whichever backend sent it: Django 5.2 flattens
``message()`` with CRLF line endings; Django 6.0+ builds the message with
``email.policy.SMTP``. Each message is serialised once, here, and handed to
the SMTP layer as bytes (never as an object to flatten again).
"""

from __future__ import annotations

import dataclasses
import email.policy
import email.utils
from collections.abc import Iterable

import django
from aiosmtplib.email import quote_address
from django.conf import settings
from django.core.mail import EmailMessage
from django.utils.encoding import force_str

from django_xoauth2_mail.exceptions import InvalidMessage
from django_xoauth2_mail.models import normalize_address

MODERN_EMAIL_API = django.VERSION >= (6, 0)


@dataclasses.dataclass(frozen=True)
class Envelope:
    sender: str
    recipients: tuple[str, ...]
    data: bytes = dataclasses.field(repr=False)
    # An address has a non-ASCII local part: only a server offering SMTPUTF8 takes it.
    smtputf8: bool = False


def build_envelope(message: EmailMessage, index: int = 0) -> Envelope:
    """Convert one message; raise InvalidMessage before anything is sent."""
    try:
        sender, sender_utf8 = envelope_address(message.from_email, message.encoding)
        recipients = [envelope_address(addr, message.encoding) for addr in message.recipients()]
        for address in [sender, *(address for address, _ in recipients)]:
            # The SMTP layer's own check (whitespace such as U+2028, "<", ">"),
            # here, so no message of the call is sent when one would fail there.
            quote_address(address)
        data = message_bytes(message)
    except ValueError as exc:  # Django's or aiosmtplib's validation: bad address, header injection
        raise InvalidMessage(
            f"Message #{index} ({force_str(message.subject)[:60]!r}) cannot be sent: {exc}. "
            "Nothing was sent from this call.",
            index=index,
        ) from exc
    return Envelope(
        sender=sender,
        recipients=tuple(address for address, _ in recipients),
        data=data,
        smtputf8=sender_utf8 or any(utf8 for _, utf8 in recipients),
    )


def message_bytes(message: EmailMessage) -> bytes:
    if MODERN_EMAIL_API:
        return message.message(policy=email.policy.SMTP).as_bytes()
    # Django 5.2's SafeMIME classes take linesep; the stubs describe the base class.
    return message.message().as_bytes(linesep="\r\n")  # type: ignore[call-arg]


def envelope_address(address: object, encoding: str | None) -> tuple[str, bool]:
    """The addr-spec for MAIL FROM / RCPT TO, and whether it needs SMTPUTF8.

    ASCII addresses (IDN domains punycoded) go exactly as Django's SMTP
    backend sends them; a non-ASCII local part, which Django cannot encode,
    is kept in UTF-8 for servers that offer SMTPUTF8.
    """
    if MODERN_EMAIL_API:
        from django.core.mail.backends.smtp import EmailBackend as DjangoSMTPBackend

        # prep_address() does not use its instance; calling it keeps us
        # byte-for-byte with Django's validation and IDNA encoding.
        try:
            return DjangoSMTPBackend.prep_address(None, address), False  # type: ignore[arg-type]
        except ValueError:
            utf8 = DjangoSMTPBackend.prep_address(None, address, force_ascii=False)  # type: ignore[arg-type]
            return utf8, True
    from django.core.mail.message import sanitize_address

    sanitized = sanitize_address(address, encoding or settings.DEFAULT_CHARSET)  # type: ignore[arg-type]
    addr_spec = email.utils.parseaddr(force_str(address))[1]
    local_part = addr_spec.rpartition("@")[0]
    if local_part and not local_part.isascii():
        return addr_spec, True
    return email.utils.parseaddr(sanitized)[1], False


def sender_candidates(message: EmailMessage) -> Iterable[str]:
    """Addresses that may name the sending Mailbox: From, then Sender."""
    yield normalize_address(email.utils.parseaddr(force_str(message.from_email))[1])
    for name, value in (message.extra_headers or {}).items():
        if name.lower() == "sender":
            yield normalize_address(email.utils.parseaddr(force_str(value))[1])
