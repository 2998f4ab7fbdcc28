"""``manage.py disconnect_mailbox ADDRESS``: revoke the consent, wipe the tokens."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand

from django_xoauth2_mail.consent.cli import command_errors, find_mailbox
from django_xoauth2_mail.exceptions import XOAuth2MailError
from django_xoauth2_mail.models import Mailbox
from django_xoauth2_mail.providers import get_provider_class
from django_xoauth2_mail.tokens import (
    readable_refresh_token,
    revoke_at_provider,
    tokens_readable,
    wipe_tokens,
)

# Where a person removes the app's access by hand, when revocation did not happen here.
MANUAL_REVOCATION = {
    "google": "https://myaccount.google.com/permissions",
    "microsoft": "https://myapps.microsoft.com (work or school accounts) or "
    "https://account.live.com/consent/Manage (personal accounts)",
}


class Command(BaseCommand):
    help = (
        "Disconnect a mailbox: revoke its consent at the provider where the provider offers "
        "revocation, wipe its stored tokens and mark it disconnected (--delete removes it)."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("address", help="The mailbox to disconnect.")
        parser.add_argument(
            "--delete", action="store_true", help="Delete the mailbox instead of keeping it."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        with command_errors():
            mailbox = find_mailbox(options["address"])
        self._revoke(mailbox)
        if options["delete"]:
            mailbox.delete()
            self.stdout.write(f"Deleted the mailbox {mailbox.email} and its tokens.")
            return
        wipe_tokens(mailbox)
        self.stdout.write(
            f"Wiped the stored tokens of {mailbox.email}; it is disconnected and cannot send. "
            f"`python manage.py connect_mailbox {mailbox.provider} --email {mailbox.email}` "
            "connects it again."
        )

    def _revoke(self, mailbox: Mailbox) -> None:
        where = MANUAL_REVOCATION.get(mailbox.provider, "the account's security settings")
        if not tokens_readable(mailbox):
            self.stderr.write(
                f"The stored tokens of {mailbox.email} cannot be decrypted with the configured "
                "keys (SECRET_KEY or ENCRYPTION_KEYS changed without keeping the old key), so "
                f"they cannot be revoked from here; they are wiped all the same. To cut the "
                f"app off, remove its access at {where}."
            )
            return
        # The refresh token stands for the whole grant (RFC 7009 section 2.1).
        token = readable_refresh_token(mailbox)
        if not token:
            self.stdout.write(f"{mailbox.email} holds no tokens: nothing to revoke.")
            return
        revoked = revoke_at_provider(mailbox.provider, token)
        try:
            name = get_provider_class(mailbox.provider).name
        except XOAuth2MailError:  # a provider id this version does not know
            name = mailbox.provider
        if revoked:
            self.stdout.write(f"Revoked the consent of {mailbox.email} at {name}.")
            return
        self.stderr.write(
            f"{name} did not revoke the consent of {mailbox.email} (it offers no revocation "
            f"here, or did not answer). To cut the app off, remove its access at {where}."
        )
