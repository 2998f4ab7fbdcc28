"""The Mailbox admin: status at a glance, the Connect / Reconnect consent flow
(views.py), and actions to test, refresh and disconnect a mailbox.

Tokens never reach a page: the token fields are excluded from every form and
no column, read-only field or message shows them, not even masked.
"""

from __future__ import annotations

import datetime as dt
import smtplib
from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.mail import EmailMessage
from django.db.models import QuerySet, TextField
from django.db.models.functions import Cast
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from django_xoauth2_mail import crypto, outbox, tokens, views
from django_xoauth2_mail.backends import EmailBackend
from django_xoauth2_mail.consent.cli import last_error_is_past
from django_xoauth2_mail.exceptions import XOAuth2MailError
from django_xoauth2_mail.models import Mailbox, MailboxStatus, OutboxMessage, OutboxStatus
from django_xoauth2_mail.setup_checks import sending_problems

TOKEN_FIELDS = ("refresh_token", "access_token", "token_version")
SHOWN_FIELDS = (
    "email",
    "provider",
    "status_badge",
    "access_token_expires_at",
    "scopes",
    "last_error",
    "last_error_at",
    "last_refreshed_at",
    "last_sent_at",
    "outbox_link",
    "created_at",
    "updated_at",
)
# (background, text) per status: readable in the admin's light and dark themes.
STATUS_COLOURS: dict[str, tuple[str, str]] = {
    MailboxStatus.CONNECTED: ("#2e7d32", "#ffffff"),
    MailboxStatus.RECONNECT_REQUIRED: ("#c62828", "#ffffff"),
    MailboxStatus.DISCONNECTED: ("#616161", "#ffffff"),
}
TEMPLATES = "admin/django_xoauth2_mail/mailbox"
# A badge of its own, not a stored status: the row's tokens do not decrypt.
UNDECRYPTABLE = "undecryptable"
STATUS_COLOURS[UNDECRYPTABLE] = ("#e65100", "#ffffff")


def tokens_decryptable(mailbox: Mailbox) -> bool:
    """From the ciphertext get_queryset() annotates, without loading the fields."""
    return all(
        crypto.is_decryptable(getattr(mailbox, name, None))
        for name in ("sealed_refresh_token", "sealed_access_token")
    )


# The change list's error column, shortened (the title attribute has it all), and free
# to break inside a long word (a URL) rather than widen the table past the screen.
LAST_ERROR_CHARS = 60
WRAP_ANYWHERE = "display:inline-block;min-width:9em;overflow-wrap:anywhere"


if TYPE_CHECKING:
    _ModelAdmin = admin.ModelAdmin[Mailbox]
else:  # ModelAdmin is generic for django-stubs only, not at run time.
    _ModelAdmin = admin.ModelAdmin


@admin.register(Mailbox)
class MailboxAdmin(_ModelAdmin):
    # Narrow enough for a 1280 px screen with the admin's navigation sidebar open: the
    # provider and the Outbox link sit under the address, the last token refresh is on
    # the mailbox's page.
    list_display = (
        "address",
        "status_badge",
        "token_expires",
        "last_error_short",
        "last_send",
    )
    # Providers in use, not every known id: a site has one or two.
    list_filter = (("provider", admin.AllValuesFieldListFilter), "status")
    search_fields = ("email",)
    # Nothing here is for hand editing: an address or provider belongs to a
    # consent, the rest is written by the token layer.
    fields = SHOWN_FIELDS
    readonly_fields = SHOWN_FIELDS
    exclude = TOKEN_FIELDS
    actions = ("send_test_email", "refresh_access_token_now", "disconnect_mailboxes")
    change_list_template = f"{TEMPLATES}/change_list.html"
    change_form_template = f"{TEMPLATES}/change_form.html"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Mailbox]:
        # The token columns are never shown: not loading them keeps every page working
        # when they cannot be decrypted (SECRET_KEY changed without a fallback); their
        # ciphertext, read as plain text, tells which rows are affected.
        return (
            super()
            .get_queryset(request)
            .defer(*tokens.TOKEN_FIELDS)
            .annotate(
                sealed_refresh_token=Cast("refresh_token", TextField()),
                sealed_access_token=Cast("access_token", TextField()),
            )
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # mailboxes are created by the Connect flow, which needs consent

    def get_urls(self) -> list[URLPattern]:
        info = f"{self.opts.app_label}_{self.opts.model_name}"
        wrap = self.admin_site.admin_view
        return [
            # Before the default URLs, whose "<object_id>/" would catch "connect/".
            path("connect/", wrap(self.connect_view), name=f"{info}_connect"),
            path("connect/callback/", wrap(self.callback_view), name=f"{info}_connect_callback"),
            *super().get_urls(),
        ]

    def connect_view(self, request: HttpRequest) -> HttpResponse:
        return views.connect_view(request, self)

    def callback_view(self, request: HttpRequest) -> HttpResponse:
        return views.callback_view(request, self)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        extra = {
            "can_connect": self.has_change_permission(request),
            # Mail that no mailbox would send (SERVER_EMAIL, a provider not configured).
            "sending_problems": sending_problems(),
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        mailbox = self.get_object(request, object_id)
        # Every field is read-only, so a Save button would save nothing.
        extra = {
            "tokens_undecryptable": mailbox is not None and not tokens_decryptable(mailbox),
            "can_connect": self.has_change_permission(request),
            "show_save": False,
            "show_save_and_continue": False,
            "show_save_and_add_another": False,
            **(extra_context or {}),
        }
        return super().change_view(request, object_id, form_url, extra)

    # Columns ------------------------------------------------------------------

    @admin.display(description=gettext_lazy("address"), ordering="email")
    def address(self, mailbox: Mailbox) -> SafeString:
        # The provider and a link to the mailbox's queued mail under the address, not
        # in columns of their own (1280 px, see list_display).
        return format_html(
            '{}<br><span class="xoauth2-provider" style="color:var(--body-quiet-color)">{}</span>'
            " · {}",
            mailbox.email,
            mailbox.provider,
            outbox_link_for(mailbox),
        )

    # Times through these two rather than the fields: Django keeps a date-time field's
    # cell on one line ("nowrap"), which widens the list past a 1280 px screen.
    @admin.display(description=gettext_lazy("token expires"), ordering="access_token_expires_at")
    def token_expires(self, mailbox: Mailbox) -> str:
        return _moment(mailbox.access_token_expires_at)

    @admin.display(description=gettext_lazy("last send"), ordering="last_sent_at")
    def last_send(self, mailbox: Mailbox) -> str:
        return _moment(mailbox.last_sent_at)

    @admin.display(description=gettext_lazy("status"), ordering="status")
    def status_badge(self, mailbox: Mailbox) -> SafeString:
        status, label = mailbox.status, mailbox.get_status_display()
        if not tokens_decryptable(mailbox):
            status, label = UNDECRYPTABLE, _("Cannot be decrypted")
        background, colour = STATUS_COLOURS.get(status, ("#616161", "#ffffff"))
        badge = format_html(
            '<span class="xoauth2-status xoauth2-status-{}" style="background:{};color:{};'
            'padding:2px 8px;border-radius:10px;font-weight:bold;white-space:nowrap">{}</span>',
            status,
            background,
            colour,
            label,
        )
        if status == MailboxStatus.CONNECTED:
            return badge
        url = f"{views.admin_url(self, 'connect')}?mailbox={mailbox.pk}"
        return format_html('{} <a href="{}">{}</a>', badge, url, _("Reconnect"))

    @admin.display(description=gettext_lazy("last error"))
    def last_error_short(self, mailbox: Mailbox) -> str:
        if not mailbox.last_error:
            return ""
        short = Truncator(mailbox.last_error).chars(LAST_ERROR_CHARS)
        if mailbox.last_error_at is not None and last_error_is_past(mailbox):
            # A refresh or send succeeded since: history, shown as such with its time.
            when = date_format(timezone.localtime(mailbox.last_error_at), "DATETIME_FORMAT")
            return format_html(
                '<span class="xoauth2-past-error" title="{}" style="opacity:.65;{}">{}</span>',
                mailbox.last_error,
                WRAP_ANYWHERE,
                _("Earlier (%(when)s): %(error)s") % {"when": when, "error": short},
            )
        return format_html(
            '<span title="{}" style="{}">{}</span>', mailbox.last_error, WRAP_ANYWHERE, short
        )

    @admin.display(description=gettext_lazy("outbox"))
    def outbox_link(self, mailbox: Mailbox) -> SafeString:
        return outbox_link_for(mailbox)

    # Actions ------------------------------------------------------------------

    @admin.action(description=gettext_lazy("Send a test email"), permissions=["change"])
    def send_test_email(self, request: HttpRequest, queryset: QuerySet[Mailbox]) -> None:
        recipient = getattr(request.user, "email", "")
        if not recipient:
            self.message_user(
                request,
                _(
                    "Your user account has no email address, so there is nowhere to send the "
                    "test email. Add one to your user and run the action again."
                ),
                messages.ERROR,
            )
            return
        for mailbox in queryset:
            self._send_test_email(request, mailbox, recipient)

    def _send_test_email(self, request: HttpRequest, mailbox: Mailbox, recipient: str) -> None:
        message = EmailMessage(
            subject=_("Test email from %(email)s") % {"email": mailbox.email},
            body=_(
                "This test email was sent from the Django admin through the mailbox "
                "%(email)s over SMTP with OAuth2 (XOAUTH2 or OAUTHBEARER). It arrived, so the "
                "mailbox works."
            )
            % {"email": mailbox.email},
            from_email=mailbox.email,
            to=[recipient],
        )
        # Held open across the send, so its session can tell which mechanism it used.
        backend = EmailBackend(mailbox=mailbox.email)
        backend.open()
        try:
            backend.send_messages([message])
            mechanism = ", ".join(sorted(backend.dispatcher.sasl_mechanisms)) or "OAuth2"
        except (XOAuth2MailError, smtplib.SMTPException, OSError) as exc:
            self.message_user(
                request,
                _("The test email from %(email)s was not sent: %(error)s")
                % {"email": mailbox.email, "error": exc},
                messages.ERROR,
            )
            return
        finally:
            backend.close()
        self.message_user(
            request,
            _(
                "Sent a test email from %(email)s to %(to)s over SMTP with %(mechanism)s; "
                "check that it arrived."
            )
            % {"email": mailbox.email, "to": recipient, "mechanism": mechanism},
            messages.SUCCESS,
        )

    @admin.action(description=gettext_lazy("Refresh the access token now"), permissions=["change"])
    def refresh_access_token_now(self, request: HttpRequest, queryset: QuerySet[Mailbox]) -> None:
        for mailbox in queryset:
            try:
                # Naming the current token as rejected forces a refresh even if it is fresh.
                # (Read inside the try: it may not decrypt.)
                tokens.get_access_token(mailbox, rejected_token=mailbox.access_token)
            except XOAuth2MailError as exc:
                self.message_user(request, str(exc), messages.ERROR)
                continue
            expires = mailbox.access_token_expires_at
            # The time in brackets: formats such as "2:24 a.m." end with a period.
            self.message_user(
                request,
                _("Refreshed the access token of %(email)s (the new one expires %(when)s).")
                % {
                    "email": mailbox.email,
                    "when": date_format(timezone.localtime(expires), "DATETIME_FORMAT")
                    if expires
                    else "?",
                },
                messages.SUCCESS,
            )

    @admin.action(description=gettext_lazy("Disconnect"), permissions=["change"])
    def disconnect_mailboxes(
        self, request: HttpRequest, queryset: QuerySet[Mailbox]
    ) -> HttpResponse | None:
        if request.POST.get("post") != "yes":
            return self._disconnect_confirmation(request, queryset)
        for mailbox in queryset:
            self._disconnect(request, mailbox)
        return None

    def _disconnect_confirmation(
        self, request: HttpRequest, queryset: QuerySet[Mailbox]
    ) -> HttpResponse:
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": _("Disconnect mailboxes?"),
            "mailboxes": list(queryset),
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, f"{TEMPLATES}/disconnect_confirmation.html", context)

    def _disconnect(self, request: HttpRequest, mailbox: Mailbox) -> None:
        refresh_token = tokens.wipe_tokens(mailbox)
        self.log_change(request, mailbox, "Disconnected: tokens wiped.")
        if tokens.revoke_at_provider(mailbox.provider, refresh_token):
            text = _("Disconnected %(email)s: its tokens are wiped and the provider revoked them.")
        else:
            text = _(
                "Disconnected %(email)s: its tokens are wiped here, but the provider did not "
                "revoke the grant (it offers no revocation, or did not answer). To end it "
                "there too, remove this application's access in the account's security "
                "settings at the provider."
            )
        self.message_user(request, text % {"email": mailbox.email}, messages.SUCCESS)

    # Deleting -------------------------------------------------------------------------
    # A deleted row would otherwise leave its grant alive at the provider, with nobody
    # here left to revoke it: deletion revokes, like Disconnect.

    def delete_model(self, request: HttpRequest, obj: Mailbox) -> None:
        self._report_revocation(request, obj.email, tokens.delete_and_revoke(obj))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Mailbox]) -> None:
        for mailbox in queryset:
            self._report_revocation(request, mailbox.email, tokens.delete_and_revoke(mailbox))

    def _report_revocation(self, request: HttpRequest, email: str, revoked: bool) -> None:
        if revoked:
            text = _("Deleted %(email)s: the provider revoked its grant.")
            level = messages.SUCCESS
        else:
            text = _(
                "Deleted %(email)s, but the provider did not revoke its grant (it offers no "
                "revocation, or did not answer). To end it there too, remove this "
                "application's access in the account's security settings at the provider."
            )
            level = messages.WARNING
        self.message_user(request, text % {"email": email}, level)


def _moment(moment: dt.datetime | None) -> str:
    return date_format(timezone.localtime(moment), "DATETIME_FORMAT") if moment else "-"


# The Outbox: messages queued by TaskEmailBackend. ---------------------------

OUTBOX_COLOURS: dict[str, tuple[str, str]] = {
    OutboxStatus.QUEUED: ("#1565c0", "#ffffff"),
    OutboxStatus.SENDING: ("#6a1b9a", "#ffffff"),
    OutboxStatus.SENT: ("#2e7d32", "#ffffff"),
    OutboxStatus.FAILED: ("#c62828", "#ffffff"),
    OutboxStatus.UNDETERMINED: ("#ef6c00", "#ffffff"),
}
OUTBOX_FIELDS = (
    "message_id",
    "mailbox",
    "outbox_status",
    "subject",
    "sender",
    "recipients",
    "message_size",
    "attempts",
    "last_error",
    "refused_recipients",
    "created_at",
    "next_attempt_at",
    "sent_at",
    "updated_at",
)

if TYPE_CHECKING:
    _OutboxAdminBase = admin.ModelAdmin[OutboxMessage]
else:
    _OutboxAdminBase = admin.ModelAdmin


def outbox_link_for(mailbox: Mailbox) -> SafeString:
    url = reverse("admin:django_xoauth2_mail_outboxmessage_changelist")
    return format_html('<a href="{}?mailbox__id__exact={}">{}</a>', url, mailbox.pk, _("Outbox"))


@admin.register(OutboxMessage)
class OutboxMessageAdmin(_OutboxAdminBase):
    """What TaskEmailBackend queued and what became of it; Resend and Delete."""

    list_display = (
        "subject",
        "mailbox",
        "outbox_status",
        "attempts",
        "created_at",
        "sent_at",
        "failure_reason",
    )
    list_filter = ("status", "mailbox")
    list_select_related = ("mailbox",)
    search_fields = ("subject", "message_id", "recipients")
    date_hierarchy = "created_at"
    fields = OUTBOX_FIELDS
    readonly_fields = OUTBOX_FIELDS
    actions = ("resend_messages", "delete_selected")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # messages come from TaskEmailBackend

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        extra = {"show_save": False, "show_save_and_continue": False, **(extra_context or {})}
        return super().change_view(request, object_id, form_url, extra)

    @admin.display(description=gettext_lazy("status"), ordering="status")
    def outbox_status(self, message: OutboxMessage) -> SafeString:
        background, colour = OUTBOX_COLOURS.get(message.status, ("#616161", "#ffffff"))
        return format_html(
            '<span class="xoauth2-outbox-{}" style="background:{};color:{};padding:2px 8px;'
            'border-radius:10px;font-weight:bold;white-space:nowrap">{}</span>',
            message.status,
            background,
            colour,
            message.get_status_display(),
        )

    @admin.display(description=gettext_lazy("failure reason"))
    def failure_reason(self, message: OutboxMessage) -> str:
        if (
            not message.last_error
            or message.status == OutboxStatus.SENT
            and not (message.refused_recipients)
        ):
            return ""
        short = Truncator(message.last_error).chars(100)
        return format_html('<span title="{}">{}</span>', message.last_error, short)

    @admin.display(description=gettext_lazy("size"))
    def message_size(self, message: OutboxMessage) -> str:
        return f"{len(message.data):,} bytes"

    @admin.action(description=gettext_lazy("Resend selected messages"), permissions=["change"])
    def resend_messages(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> None:
        # Imported here: the rest of the admin works without the Tasks framework.
        from django_xoauth2_mail import tasks

        wanted = list(queryset.values_list("pk", flat=True))
        requeued = outbox.resend(wanted)
        if requeued:
            tasks.enqueue(OutboxMessage.objects.filter(pk__in=requeued))
            self.message_user(
                request,
                _("%(count)d message(s) queued to be sent again.") % {"count": len(requeued)},
                messages.SUCCESS,
            )
        if len(requeued) < len(wanted):
            self.message_user(
                request,
                _(
                    "%(count)d message(s) are being sent right now and were left alone; if "
                    "their worker stopped, they come back after OUTBOX_LEASE (or run "
                    "manage.py retry_outbox)."
                )
                % {"count": len(wanted) - len(requeued)},
                messages.WARNING,
            )
