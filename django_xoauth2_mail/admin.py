"""The Mailbox admin: status at a glance, the Connect / Reconnect consent flow
(views.py), and actions to test, refresh and disconnect a mailbox.

Tokens never reach a page: the token fields are excluded from every form and
no column, read-only field or message shows them, not even masked.
"""

from __future__ import annotations

import smtplib
from typing import TYPE_CHECKING, Any

from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.mail import EmailMessage
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils.formats import date_format
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from django_xoauth2_mail import outbox, tokens, views
from django_xoauth2_mail.backends import EmailBackend
from django_xoauth2_mail.exceptions import XOAuth2MailError
from django_xoauth2_mail.models import Mailbox, MailboxStatus, OutboxMessage, OutboxStatus

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


if TYPE_CHECKING:
    _ModelAdmin = admin.ModelAdmin[Mailbox]
else:  # ModelAdmin is generic for django-stubs only, not at run time.
    _ModelAdmin = admin.ModelAdmin


@admin.register(Mailbox)
class MailboxAdmin(_ModelAdmin):
    list_display = (
        "email",
        "provider",
        "status_badge",
        "access_token_expires_at",
        "last_error_short",
        "last_sent_at",
        "last_refreshed_at",
        "outbox_link",
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
        extra = {"can_connect": self.has_change_permission(request), **(extra_context or {})}
        return super().changelist_view(request, extra)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        # Every field is read-only, so a Save button would save nothing.
        extra = {
            "can_connect": self.has_change_permission(request),
            "show_save": False,
            "show_save_and_continue": False,
            "show_save_and_add_another": False,
            **(extra_context or {}),
        }
        return super().change_view(request, object_id, form_url, extra)

    # Columns ------------------------------------------------------------------

    @admin.display(description=gettext_lazy("status"), ordering="status")
    def status_badge(self, mailbox: Mailbox) -> SafeString:
        background, colour = STATUS_COLOURS.get(mailbox.status, ("#616161", "#ffffff"))
        badge = format_html(
            '<span class="xoauth2-status xoauth2-status-{}" style="background:{};color:{};'
            'padding:2px 8px;border-radius:10px;font-weight:bold;white-space:nowrap">{}</span>',
            mailbox.status,
            background,
            colour,
            mailbox.get_status_display(),
        )
        if mailbox.status == MailboxStatus.CONNECTED:
            return badge
        url = f"{views.admin_url(self, 'connect')}?mailbox={mailbox.pk}"
        return format_html('{} <a href="{}">{}</a>', badge, url, _("Reconnect"))

    @admin.display(description=gettext_lazy("last error"))
    def last_error_short(self, mailbox: Mailbox) -> str:
        if not mailbox.last_error:
            return ""
        short = Truncator(mailbox.last_error).chars(80)
        return format_html('<span title="{}">{}</span>', mailbox.last_error, short)

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
                "%(email)s over SMTP with OAuth2 (XOAUTH2). It arrived, so the mailbox works."
            )
            % {"email": mailbox.email},
            from_email=mailbox.email,
            to=[recipient],
        )
        try:
            EmailBackend(mailbox=mailbox.email).send_messages([message])
        except (XOAuth2MailError, smtplib.SMTPException, OSError) as exc:
            self.message_user(
                request,
                _("The test email from %(email)s was not sent: %(error)s")
                % {"email": mailbox.email, "error": exc},
                messages.ERROR,
            )
            return
        self.message_user(
            request,
            _("Sent a test email from %(email)s to %(to)s; check that it arrived.")
            % {"email": mailbox.email, "to": recipient},
            messages.SUCCESS,
        )

    @admin.action(description=gettext_lazy("Refresh the access token now"), permissions=["change"])
    def refresh_access_token_now(self, request: HttpRequest, queryset: QuerySet[Mailbox]) -> None:
        for mailbox in queryset:
            try:
                # Naming the current token as rejected forces a refresh even if it is fresh.
                tokens.get_access_token(mailbox, rejected_token=mailbox.access_token)
            except XOAuth2MailError as exc:
                self.message_user(request, str(exc), messages.ERROR)
                continue
            expires = mailbox.access_token_expires_at
            self.message_user(
                request,
                _("Refreshed the access token of %(email)s; the new one expires %(when)s.")
                % {
                    "email": mailbox.email,
                    "when": date_format(expires, "DATETIME_FORMAT") if expires else "?",
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
