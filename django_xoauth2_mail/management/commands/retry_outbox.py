"""Re-enqueue what is stuck in the outbox; safe from cron, alongside workers."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from django_xoauth2_mail import tasks


class Command(BaseCommand):
    help = (
        "Take back outbox messages whose worker stopped answering (after "
        "XOAUTH2_MAIL['OUTBOX_LEASE'] seconds) and enqueue again those whose task was "
        "lost (not those still waiting in a backlog, when the Tasks backend can tell). "
        "A message whose data may have reached the SMTP server is marked undetermined "
        "instead, never sent again on its own: resend it from the admin's Outbox page. "
        "Safe to run at any time, from cron, while workers run."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        requeued, undetermined = tasks.recover_stalled(force=True, lost_tasks=True)
        self.stdout.write(f"Enqueued {requeued} outbox message(s) again.")
        if undetermined:
            self.stdout.write(
                self.style.WARNING(
                    f"Marked {undetermined} message(s) undetermined: their worker stopped "
                    "after their data may have reached the server. Check them on the admin's "
                    "Outbox page and use Resend for those that did not arrive."
                )
            )
