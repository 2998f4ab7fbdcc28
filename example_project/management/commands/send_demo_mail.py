"""``manage.py send_demo_mail``: one send_mail(), and what it did to the access token.

Shows the sending mailbox's token expiry before and after the send, whether the send
refreshed it, and the SASL mechanism the SMTP login used, so a reader sees a cached token
reused, an expired one refreshed, and XOAUTH2 or OAUTHBEARER at work. ``--sasl-mechanism``
sets the provider's SASL_MECHANISM for this run only. The token itself is never printed.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import django
from django.conf import settings
from django.core.mail import EmailMultiAlternatives, get_connection, send_mail
from django.core.mail.backends.base import BaseEmailBackend
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from django_xoauth2_mail.conf import SASL_MECHANISM_VALUES
from django_xoauth2_mail.exceptions import XOAuth2MailError
from django_xoauth2_mail.models import Mailbox


def describe_expiry(expires_at: dt.datetime | None) -> str:
    if expires_at is None:
        return "no access token cached"
    seconds = round((expires_at - timezone.now()).total_seconds())
    when = timezone.localtime(expires_at).strftime("%H:%M:%S")
    if seconds > 0:
        return f"expires at {when} (in {seconds} s)"
    return f"expired at {when} ({-seconds} s ago)"


def use_sasl_mechanism(provider_id: str, mechanism: str) -> None:
    """Set ``SASL_MECHANISM`` of one provider for this process, leaving the rest as is."""
    current = getattr(settings, "XOAUTH2_MAIL", {})
    providers = dict(current.get("PROVIDERS", {}))
    providers[provider_id] = {**providers.get(provider_id, {}), "SASL_MECHANISM": mechanism}
    settings.XOAUTH2_MAIL = {**current, "PROVIDERS": providers}


def configured_backend() -> BaseEmailBackend:
    """The backend send_mail() would use: EMAIL_BACKEND, or MAILERS["default"] on 6.1."""
    if django.VERSION >= (6, 1):
        from django.core.mail import mailers  # type: ignore[attr-defined,unused-ignore]

        return mailers.default  # type: ignore[no-any-return,unused-ignore]
    return get_connection()


def send_and_tell_mechanism(subject: str, body: str, to: str) -> tuple[int, str]:
    """Send like send_mail() does, with the backend held open across the send: its
    sessions can then tell which SASL mechanism they logged in with."""
    backend = configured_backend()
    backend.open()
    try:
        if django.VERSION >= (6, 1):
            # send_mail(connection=...) is deprecated on 6.1; this is what it does.
            sent = backend.send_messages([EmailMultiAlternatives(subject, body, None, [to])])
        else:
            sent = send_mail(subject, body, None, [to], connection=backend)
        dispatcher = getattr(backend, "dispatcher", None)
        mechanisms = sorted(getattr(dispatcher, "sasl_mechanisms", ()))
    finally:
        backend.close()
    return sent or 0, ", ".join(mechanisms) or "an unknown mechanism"


class Command(BaseCommand):
    help = "Send one message with send_mail() from DEFAULT_FROM_EMAIL and report the token."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--to", default="someone@example.com", help="Recipient address.")
        parser.add_argument("--subject", default="Hello over XOAUTH2")
        parser.add_argument("--body", default="Sent by send_mail() through django_xoauth2_mail.")
        parser.add_argument(
            "--sasl-mechanism",
            choices=SASL_MECHANISM_VALUES,
            help="Set the mailbox's provider's SASL_MECHANISM for this run (default: as "
            "the settings say, 'auto' when they say nothing).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        sender = settings.DEFAULT_FROM_EMAIL
        mailbox = Mailbox.objects.filter(email=sender.lower()).first()
        if mailbox is None:
            raise CommandError(
                f"No mailbox {sender} is connected. Connect it first: "
                f"python manage.py connect_mailbox dev --email {sender}"
            )
        if options["sasl_mechanism"]:
            use_sasl_mechanism(mailbox.provider, options["sasl_mechanism"])
        version, refresh_token = mailbox.token_version, mailbox.refresh_token
        self.stdout.write(
            f"Access token before: {describe_expiry(mailbox.access_token_expires_at)}"
        )
        try:
            sent, mechanism = send_and_tell_mechanism(
                options["subject"], options["body"], options["to"]
            )
        except XOAuth2MailError as error:
            raise CommandError(str(error)) from error
        self.stdout.write(
            f"Sent {sent} message over SMTP AUTH {mechanism}: {sender} -> {options['to']} "
            f"{options['subject']!r}"
        )
        mailbox.refresh_from_db()
        after = describe_expiry(mailbox.access_token_expires_at)
        if mailbox.token_version == version:
            self.stdout.write(f"Access token after:  {after}: reused, no refresh")
        else:
            rotated = "rotated" if mailbox.refresh_token != refresh_token else "kept"
            self.stdout.write(
                self.style.SUCCESS(
                    f"Access token after:  {after}: refreshed (refresh token {rotated})"
                )
            )
