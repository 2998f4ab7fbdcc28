"""``manage.py send_test_email ADDRESS``: one message through this package's backend."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.mail import EmailMessage
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from django_xoauth2_mail.backends import EmailBackend
from django_xoauth2_mail.consent.cli import (
    command_errors,
    describe_moment,
    find_mailbox,
    unreachable_hint,
)
from django_xoauth2_mail.exceptions import XOAuth2MailError
from django_xoauth2_mail.providers import get_provider


class Command(BaseCommand):
    help = (
        "Send a test message from a mailbox over SMTP with OAuth2 (XOAUTH2 or OAUTHBEARER), "
        "through "
        "django_xoauth2_mail's backend whatever EMAIL_BACKEND says."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("address", help="The mailbox to send from.")
        parser.add_argument(
            "--to",
            action="append",
            dest="recipients",
            metavar="RECIPIENT",
            help="Who receives it (repeat for more); default: the mailbox itself.",
        )
        parser.add_argument("--subject", default="Test message from django-xoauth2-mail")

    def handle(self, *args: Any, **options: Any) -> None:
        with command_errors():
            mailbox = find_mailbox(options["address"])
            endpoint = get_provider(mailbox.provider, mailbox=mailbox.email).smtp_endpoint
        recipients = options["recipients"] or [mailbox.email]
        body = (
            f"This message was sent from {mailbox.email} by `manage.py send_test_email` at "
            f"{describe_moment(timezone.now())}, over SMTP ({endpoint.host}) authenticated "
            "with OAuth2 (XOAUTH2 or OAUTHBEARER). If you can read it, the mailbox can send."
        )
        # Held open across the send, so the session can tell which mechanism it used.
        backend = EmailBackend(mailbox=mailbox.email)
        # Handed to the backend directly: EmailMessage(connection=...) is deprecated on 6.1.
        message = EmailMessage(options["subject"], body, from_email=mailbox.email, to=recipients)
        backend.open()
        try:
            backend.send_messages([message])
            mechanism = ", ".join(sorted(backend.dispatcher.sasl_mechanisms)) or "OAuth2"
        except XOAuth2MailError as exc:
            hint = unreachable_hint(mailbox, exc)
            raise CommandError(f"The test message was not sent: {exc} {hint}".rstrip()) from None
        finally:
            backend.close()
        self.stdout.write(
            self.style.SUCCESS(
                f"Sent a test message from {mailbox.email} to {', '.join(recipients)} through "
                f"{endpoint.host}:{endpoint.port} (SMTP, {mechanism})."
            )
        )
