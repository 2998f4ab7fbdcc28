"""Re-encrypt every stored token under the newest key, after a key rotation."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from django_xoauth2_mail.exceptions import EncryptionKeyError
from django_xoauth2_mail.models import Mailbox


class Command(BaseCommand):
    help = (
        "Re-encrypt every mailbox's tokens under the newest key (the first of "
        "XOAUTH2_MAIL['ENCRYPTION_KEYS'], or SECRET_KEY). Run it after rotating keys; "
        "then the old key can be removed."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        done, unreadable = 0, []
        for pk in Mailbox.objects.order_by("pk").values_list("pk", flat=True):
            try:
                with transaction.atomic():
                    # Reading decrypts with any configured key; saving encrypts
                    # with the newest one.
                    mailbox = Mailbox.objects.select_for_update().get(pk=pk)
                    mailbox.save(update_fields=["refresh_token", "access_token", "updated_at"])
            except EncryptionKeyError:
                unreadable.append(pk)
                continue
            done += 1
        self.stdout.write(f"Re-encrypted the tokens of {done} mailbox(es) under the newest key.")
        if unreadable:
            ids = ", ".join(str(pk) for pk in unreadable)
            raise CommandError(
                f"{len(unreadable)} mailbox(es) could not be decrypted with any configured key "
                f"(ids {ids}). Add the key they were encrypted with to ENCRYPTION_KEYS or "
                "SECRET_KEY_FALLBACKS and run this again, or reconnect those mailboxes."
            )
