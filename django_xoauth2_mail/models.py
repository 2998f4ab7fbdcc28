"""One sending account per row. Tokens are stored encrypted (see crypto.py)."""

from __future__ import annotations

import datetime as dt

from django.db import models
from django.db.models.functions import Lower
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from django_xoauth2_mail.conf import PROVIDER_IDS, require_installed_app
from django_xoauth2_mail.crypto import EncryptedTextField

# Imported by EMAIL_BACKEND's backend even when the app is not installed: say so clearly.
require_installed_app()


class MailboxStatus(models.TextChoices):
    CONNECTED = "connected", _("Connected")
    RECONNECT_REQUIRED = "reconnect_required", _("Reconnect required")
    DISCONNECTED = "disconnected", _("Disconnected")


class Mailbox(models.Model):
    email = models.EmailField(
        _("address"),
        max_length=254,
        help_text=_("The account that sends; stored in lower case."),
    )
    provider = models.CharField(
        _("provider"), max_length=32, choices=[(pid, pid) for pid in PROVIDER_IDS]
    )
    # Assigned and read in clear; encrypted in the database. Never rendered.
    refresh_token = EncryptedTextField(_("refresh token"), null=True, blank=True, editable=False)
    access_token = EncryptedTextField(_("access token"), null=True, blank=True, editable=False)
    access_token_expires_at = models.DateTimeField(_("access token expires at"), null=True)
    scopes = models.TextField(_("granted scopes"), blank=True, default="")
    # Who consented, as the provider names the account for good (Microsoft: tenant id /
    # object id), so a later consent by another account can be told apart.
    account_id = models.CharField(
        _("provider account id"), max_length=255, blank=True, default="", editable=False
    )
    status = models.CharField(
        _("status"),
        max_length=32,
        choices=MailboxStatus.choices,
        default=MailboxStatus.CONNECTED,
    )
    last_error = models.TextField(_("last error"), blank=True, default="")
    last_error_at = models.DateTimeField(_("last error at"), null=True, blank=True)
    last_refreshed_at = models.DateTimeField(_("last token refresh"), null=True, blank=True)
    last_sent_at = models.DateTimeField(_("last send"), null=True, blank=True)
    # Bumped by every token refresh: a writer that read an older version
    # knows another process refreshed in between.
    token_version = models.PositiveIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(_("created"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("mailbox")
        verbose_name_plural = _("mailboxes")
        ordering = ["email"]
        constraints = [
            models.UniqueConstraint(Lower("email"), name="xoauth2_mail_mailbox_email_ci_unique"),
        ]

    def __str__(self) -> str:
        return self.email

    def __repr__(self) -> str:
        return f"<Mailbox {self.email} ({self.provider}, {self.status})>"

    def save(self, *args: object, **kwargs: object) -> None:
        self.email = normalize_address(self.email)
        super().save(*args, **kwargs)  # type: ignore[arg-type]

    def access_token_is_fresh(self, skew: float, now: dt.datetime | None = None) -> bool:
        """True while the cached token is more than ``skew`` seconds from expiry."""
        if not self.access_token or self.access_token_expires_at is None:
            return False
        if self.last_refreshed_at is not None:
            # A token that lives less than twice the skew would be stale from
            # birth and refreshed on every send: use half its lifetime instead.
            lifetime = (self.access_token_expires_at - self.last_refreshed_at).total_seconds()
            skew = min(skew, lifetime / 2)
        now = now or timezone.now()
        return self.access_token_expires_at - dt.timedelta(seconds=skew) > now


def normalize_address(address: str) -> str:
    return address.strip().lower()


class SendingLease(models.Model):
    """One unit of a mailbox's limits, shared by every process and machine that uses
    this database (sending/limits.py): a session slot (``MAX_SESSIONS`` of them per
    mailbox) or a send permit (``RATE_LIMIT`` of them). A row is free once
    ``expires_at`` has passed; taking it is a conditional UPDATE, so two takers
    never both win. Kept out of the Mailbox row, which no send writes to."""

    class Kind(models.TextChoices):
        SESSION = "session", _("SMTP session slot")
        SEND = "send", _("send permit")
        # Number 0 only: someone waits for a session slot (idle kept-alive sessions yield).
        DEMAND = "demand", _("session slot wanted")

    # No database constraint: a lease is written on its own connection, which must
    # not wait for (or fail on) a Mailbox row that the caller's open transaction holds.
    mailbox = models.ForeignKey(
        Mailbox, on_delete=models.CASCADE, related_name="+", db_constraint=False
    )
    kind = models.CharField(max_length=8, choices=Kind.choices)
    number = models.PositiveSmallIntegerField()
    # Who holds it: host, process and one lease of that process; "" once released.
    holder = models.CharField(max_length=64, blank=True, default="")
    # On the database's clock, so machines whose clocks differ still agree.
    expires_at = models.DateTimeField()

    class Meta:
        verbose_name = _("sending lease")
        constraints = [
            models.UniqueConstraint(
                fields=["mailbox", "kind", "number"], name="xoauth2_mail_lease_unique"
            ),
        ]

    def __repr__(self) -> str:
        return f"<SendingLease {self.kind} #{self.number} of mailbox {self.mailbox_id}>"


class OutboxStatus(models.TextChoices):
    QUEUED = "queued", _("Queued")
    SENDING = "sending", _("Sending")
    SENT = "sent", _("Sent")
    FAILED = "failed", _("Failed")
    UNDETERMINED = "undetermined", _("Undetermined")


class OutboxMessage(models.Model):
    """One message queued by TaskEmailBackend, with the exact bytes to send.

    The bookkeeping (outbox.py) moves it queued -> sending -> sent / failed /
    undetermined; ``end_of_data_at`` marks that the message's data was about
    to go out, after which sending it again could deliver it twice.
    """

    message_id = models.CharField(_("Message-ID"), max_length=998, blank=True, db_index=True)
    # PROTECT: deleting a mailbox must not silently drop the mail queued from it.
    mailbox = models.ForeignKey(
        Mailbox, on_delete=models.PROTECT, related_name="outbox", verbose_name=_("mailbox")
    )
    status = models.CharField(
        _("status"), max_length=16, choices=OutboxStatus.choices, default=OutboxStatus.QUEUED
    )
    subject = models.CharField(_("subject"), max_length=255, blank=True, default="")
    sender = models.TextField(_("envelope sender"))
    recipients = models.JSONField(_("envelope recipients"))
    data = models.BinaryField(_("message bytes"))
    smtputf8 = models.BooleanField(default=False)
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    last_error = models.TextField(_("last error"), blank=True, default="")
    refused_recipients = models.JSONField(_("refused recipients"), default=dict, blank=True)
    created_at = models.DateTimeField(_("queued at"), auto_now_add=True)
    sent_at = models.DateTimeField(_("sent at"), null=True, blank=True)
    # When a queued message is due (later than created_at after a temporary failure).
    next_attempt_at = models.DateTimeField(_("next attempt"), default=timezone.now)
    # The claim of the worker sending it, and until when the claim holds.
    claimed_by = models.CharField(max_length=64, blank=True, default="", editable=False)
    lease_expires_at = models.DateTimeField(null=True, blank=True, editable=False)
    end_of_data_at = models.DateTimeField(null=True, blank=True, editable=False)
    # How to enqueue it again (TaskEmailBackend's options).
    tasks_backend = models.CharField(max_length=100, default="default", editable=False)
    queue_name = models.CharField(max_length=100, default="default", editable=False)
    priority = models.IntegerField(default=0, editable=False)
    # The last task enqueued for it: retry_outbox asks the Tasks backend whether
    # it still waits, so a long backlog is not enqueued twice.
    task_id = models.CharField(max_length=64, blank=True, default="", editable=False)
    updated_at = models.DateTimeField(_("updated"), auto_now=True)

    class Meta:
        verbose_name = _("outbox message")
        verbose_name_plural = _("outbox")
        ordering = ["-created_at", "-pk"]
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="xoauth2_mail_outbox_due"),
            models.Index(fields=["status", "lease_expires_at"], name="xoauth2_mail_outbox_lease"),
        ]

    def __str__(self) -> str:
        return self.message_id or f"outbox message {self.pk}"

    def __repr__(self) -> str:
        return f"<OutboxMessage {self.pk} {self.message_id} ({self.status})>"
