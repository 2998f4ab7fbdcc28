"""``manage.py send_demo_mail``: one send_mail(), and what it did to the access token.

Shows the sending mailbox's token expiry before and after the send, and whether the send
refreshed it, so a reader sees a cached token reused and an expired one refreshed. The
token itself is never printed.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.conf import settings
from django.core.mail import send_mail
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

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


class Command(BaseCommand):
    help = "Send one message with send_mail() from DEFAULT_FROM_EMAIL and report the token."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--to", default="someone@example.com", help="Recipient address.")
        parser.add_argument("--subject", default="Hello over XOAUTH2")
        parser.add_argument("--body", default="Sent by send_mail() through django_xoauth2_mail.")

    def handle(self, *args: Any, **options: Any) -> None:
        sender = settings.DEFAULT_FROM_EMAIL
        mailbox = Mailbox.objects.filter(email=sender.lower()).first()
        if mailbox is None:
            raise CommandError(
                f"No mailbox {sender} is connected. Connect it first: "
                f"python manage.py connect_mailbox dev --email {sender}"
            )
        version, refresh_token = mailbox.token_version, mailbox.refresh_token
        self.stdout.write(
            f"Access token before: {describe_expiry(mailbox.access_token_expires_at)}"
        )
        try:
            sent = send_mail(options["subject"], options["body"], None, [options["to"]])
        except XOAuth2MailError as error:
            raise CommandError(str(error)) from error
        self.stdout.write(
            f"Sent {sent} message: {sender} -> {options['to']} {options['subject']!r}"
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
