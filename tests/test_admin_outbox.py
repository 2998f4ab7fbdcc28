"""The Outbox admin: filters, the failure reason, Resend and Delete, the link from
the Mailbox page; the worker (django-tasks-db, in this process) sends what Resend
queued, through the real XOAUTH2 SMTP server."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.core.mail import EmailMessage
from django.test import Client

from django_xoauth2_mail.backends import TaskEmailBackend
from django_xoauth2_mail.models import OutboxMessage, OutboxStatus
from tests.conftest import SENDER, make_mailbox
from tests.test_outbox import run_worker

pytestmark = pytest.mark.django_db(transaction=True)

OUTBOX = "/admin/django_xoauth2_mail/outboxmessage/"
MAILBOXES = "/admin/django_xoauth2_mail/mailbox/"


@pytest.fixture
def staff_client(django_user_model, mailbox):
    user = django_user_model.objects.create_user("staff", "staff@example.org", "pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="django_xoauth2_mail",
            codename__in=[
                "view_mailbox",
                "view_outboxmessage",
                "change_outboxmessage",
                "delete_outboxmessage",
            ],
        )
    )
    client = Client()
    client.force_login(user)
    return client


def queued(*subjects: str) -> list[OutboxMessage]:
    TaskEmailBackend().send_messages(
        [EmailMessage(subject, "Body", SENDER, ["to@example.org"]) for subject in subjects]
    )
    return list(OutboxMessage.objects.order_by("pk"))


def test_outbox_lists_messages_with_status_filters_and_failure_reason(staff_client, mailbox):
    first, second = queued("Arrived", "Bounced")
    OutboxMessage.objects.filter(pk=first.pk).update(status=OutboxStatus.SENT)
    OutboxMessage.objects.filter(pk=second.pk).update(
        status=OutboxStatus.FAILED, last_error="the server refused the message: 554 spam"
    )

    page = staff_client.get(OUTBOX).content.decode()
    assert "Arrived" in page and "Bounced" in page
    assert "554 spam" in page  # the failure reason, in the list
    failed = staff_client.get(OUTBOX, {"status__exact": "failed"}).content.decode()
    assert "Bounced" in failed and "Arrived" not in failed
    by_mailbox = staff_client.get(OUTBOX, {"mailbox__id__exact": mailbox.pk}).content.decode()
    assert "Arrived" in by_mailbox
    found = staff_client.get(OUTBOX, {"q": "Bounced"}).content.decode()
    assert "Bounced" in found and "Arrived" not in found
    by_recipient = staff_client.get(OUTBOX, {"q": "to@example.org"})
    assert by_recipient.status_code == 200 and "Arrived" in by_recipient.content.decode()
    detail = staff_client.get(f"{OUTBOX}{second.pk}/change/").content.decode()
    assert "554 spam" in detail and "to@example.org" in detail


def test_mailbox_page_links_to_its_outbox(staff_client, mailbox, oauth2_server):
    other = make_mailbox(oauth2_server, "other@example.com")
    page = staff_client.get(f"{MAILBOXES}{mailbox.pk}/change/").content.decode()
    assert f"{OUTBOX}?mailbox__id__exact={mailbox.pk}" in page
    listing = staff_client.get(MAILBOXES).content.decode()
    assert f"{OUTBOX}?mailbox__id__exact={other.pk}" in listing


def test_resend_queues_undetermined_and_failed_messages_again(
    staff_client, mailbox, xoauth2_smtp_server
):
    undetermined, failed, sending = queued("Maybe", "Failed", "Sending")
    OutboxMessage.objects.filter(pk=undetermined.pk).update(status=OutboxStatus.UNDETERMINED)
    OutboxMessage.objects.filter(pk=failed.pk).update(status=OutboxStatus.FAILED, attempts=5)
    OutboxMessage.objects.filter(pk=sending.pk).update(status=OutboxStatus.SENDING)

    response = staff_client.post(
        OUTBOX,
        {"action": "resend_messages", "_selected_action": [undetermined.pk, failed.pk, sending.pk]},
        follow=True,
    )
    page = response.content.decode()
    assert "2 message(s) queued to be sent again" in page
    assert "1 message(s) are being sent right now" in page
    run_worker()
    statuses = dict(OutboxMessage.objects.values_list("subject", "status"))
    assert statuses == {"Maybe": "sent", "Failed": "sent", "Sending": "sending"}
    assert len(xoauth2_smtp_server.messages) == 2


def test_delete_action(staff_client, mailbox):
    first, second = queued("Keep", "Drop")
    response = staff_client.post(
        OUTBOX, {"action": "delete_selected", "_selected_action": [second.pk], "post": "yes"}
    )
    assert response.status_code == 302
    assert list(OutboxMessage.objects.values_list("subject", flat=True)) == ["Keep"]


def test_outbox_cannot_be_added_or_edited(staff_client, mailbox):
    (message,) = queued("Read only")
    assert staff_client.get(f"{OUTBOX}add/").status_code == 403
    staff_client.post(f"{OUTBOX}{message.pk}/change/", {"subject": "Changed"})
    message.refresh_from_db()
    assert message.subject == "Read only"
