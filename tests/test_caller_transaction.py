"""Sending inside the caller's transaction (ATOMIC_REQUESTS, ``transaction.atomic``,
django-mailer): a refresh needed mid-send must never wait for a lock that the caller's
own transaction holds. Runs on SQLite here and on PostgreSQL in the -postgres env.

Each send runs in a thread joined with a timeout, so a deadlock fails the test instead of
hanging the run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.core import mail
from django.db import connection, transaction

from django_xoauth2_mail.exceptions import MailboxReconnectRequired
from django_xoauth2_mail.models import Mailbox
from tests.conftest import SENDER

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

# Far above what a send here takes, far below "for ever".
DEADLINE = 30.0


def bounded(function: Callable[[], Any]) -> Any:
    """Run ``function`` in a thread with its own connection; its result, or what it raised."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = function()
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(DEADLINE)
    assert not thread.is_alive(), f"the send did not end within {DEADLINE} s (a deadlock)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def send(subject: str) -> int:
    return mail.send_mail(subject, "Body", SENDER, ["to@example.org"])


def test_refused_token_between_two_sends_in_one_transaction(
    mailbox, oauth2_server, xoauth2_smtp_server
):
    def view() -> int:
        with transaction.atomic():
            first = send("first")  # refreshes: the transaction now holds the Mailbox row
            # The cached token still looks fresh here; the server now answers 535.
            oauth2_server.expire_access_tokens()
            return first + send("second")

    assert bounded(view) == 2
    assert len(xoauth2_smtp_server.messages) == 2
    assert oauth2_server.token_request_count == 2


def test_revoked_consent_in_a_transaction_is_reported_and_flagged(
    mailbox, oauth2_server, xoauth2_smtp_server
):
    def view() -> Exception:
        with transaction.atomic():
            send("first")
            mailbox_row = Mailbox.objects.get(pk=mailbox.pk)
            oauth2_server.revoke(mailbox_row.refresh_token)  # and its access tokens
            try:
                send("second")
            except MailboxReconnectRequired as exc:  # django-mailer defers and commits
                return exc
        raise AssertionError("the revoked consent was not reported")

    error = bounded(view)
    assert "must be reconnected" in str(error)
    mailbox.refresh_from_db()
    assert mailbox.status == "reconnect_required"
    assert len(xoauth2_smtp_server.messages) == 1


def test_expired_token_in_a_transaction_that_wrote_first(
    mailbox, oauth2_server, xoauth2_smtp_server
):
    def view() -> int:
        with transaction.atomic():
            # The caller's own write (SQLite: the database write lock is now held).
            Mailbox.objects.filter(pk=mailbox.pk).update(last_error="")
            first = send("first")
            Mailbox.objects.filter(pk=mailbox.pk).update(access_token_expires_at=None)
            oauth2_server.expire_access_tokens()
            return first + send("second")

    assert bounded(view) == 2
    assert len(xoauth2_smtp_server.messages) == 2
