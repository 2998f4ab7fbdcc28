"""``manage.py list_mailboxes``: every Mailbox with its status, in a table."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from django_xoauth2_mail.consent.cli import (
    describe_expiry,
    describe_moment,
    format_table,
    last_error_is_past,
)
from django_xoauth2_mail.exceptions import connect_command
from django_xoauth2_mail.models import Mailbox, MailboxStatus
from django_xoauth2_mail.setup_checks import sending_problems

HEADERS = ("ADDRESS", "PROVIDER", "STATUS", "ACCESS TOKEN", "LAST SEND", "LAST ERROR")
# The error column keeps the table on one line per mailbox; the admin shows it in full.
ERROR_WIDTH = 60


class Command(BaseCommand):
    help = (
        "List the mailboxes: status, when the cached access token expires (it is refreshed "
        "automatically), the last send and the last error. Tokens are never shown."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        mailboxes = list(Mailbox.objects.order_by("email"))
        if not mailboxes:
            self.stdout.write(
                "No mailboxes yet. Connect one with `python manage.py connect_mailbox PROVIDER`."
            )
            return
        for line in format_table(HEADERS, [_row(mailbox) for mailbox in mailboxes]):
            self.stdout.write(line)
        for note in _problems(mailboxes):
            self.stderr.write(note)


def _problems(mailboxes: list[Mailbox]) -> list[str]:
    """What keeps mail from going out, each with its fix, for the person to act on."""
    notes = []
    waiting = [m for m in mailboxes if m.status == MailboxStatus.RECONNECT_REQUIRED]
    if waiting:
        notes.append(f"{len(waiting)} mailbox(es) must be reconnected before they can send:")
        notes += [f"  {connect_command(m.email, m.provider)}" for m in waiting]
    return notes + sending_problems()


def _row(mailbox: Mailbox) -> list[str]:
    error = " ".join(mailbox.last_error.split())  # one line
    if len(error) > ERROR_WIDTH:
        error = error[: ERROR_WIDTH - 3] + "..."
    when = f" ({describe_moment(mailbox.last_error_at)})" if error else ""
    if error and last_error_is_past(mailbox):
        error = f"earlier: {error}"  # a refresh or send succeeded since
    return [
        mailbox.email,
        mailbox.provider,
        str(MailboxStatus(mailbox.status).label),
        describe_expiry(mailbox.access_token_expires_at),
        describe_moment(mailbox.last_sent_at),
        f"{error}{when}" if error else "-",
    ]
