"""RATE_LIMIT and MAX_SESSIONS shared through the database (sending/limits.py).

Another process is played by rows it would have written (a holder that is not us);
tests/sending/test_limits_processes.py runs real processes against one server.
"""

from __future__ import annotations

import datetime as dt
import pickle
import time
from typing import Any

import pytest
from django.core.checks import run_checks
from django.core.mail import EmailMessage
from django.db import transaction
from django.db.models.functions import Now

from django_xoauth2_mail.backends import EmailBackend
from django_xoauth2_mail.exceptions import SendError, SendingLimitReached
from django_xoauth2_mail.models import Mailbox, SendingLease
from django_xoauth2_mail.sending import leases, limits
from django_xoauth2_mail.sending.loop import mail_loop
from django_xoauth2_mail.sending.pool import pool
from tests.conftest import SENDER, make_mailbox

pytestmark = pytest.mark.django_db(transaction=True)
OTHER = "otherhost:4242:0:feedbeef"  # a holder in another process


@pytest.fixture(autouse=True)
def empty_pool():
    yield
    mail_loop.run(pool.close_all())


@pytest.fixture
def capped(oauth2_settings: dict[str, Any]) -> dict[str, Any]:
    """The oauth2 provider with small shared limits and a short wait."""
    oauth2_settings["PROVIDERS"]["oauth2"].update(RATE_LIMIT=50, MAX_SESSIONS=2)
    oauth2_settings["LIMIT_WAIT"] = 0.5
    return oauth2_settings


def batch(count: int, sender: str = SENDER, prefix: str = "M") -> list[EmailMessage]:
    return [EmailMessage(f"{prefix}{n}", "Body", sender, ["to@example.org"]) for n in range(count)]


def held_elsewhere(mailbox: Mailbox, kind: str, count: int, seconds: float) -> None:
    for number in range(count):
        SendingLease.objects.create(
            mailbox=mailbox,
            kind=kind,
            number=number,
            holder=OTHER,
            expires_at=Now() + dt.timedelta(seconds=seconds),
        )


def test_slots_held_by_other_processes_stop_a_send_with_a_clear_error(
    capped, mailbox, xoauth2_smtp_server
):
    held_elsewhere(mailbox, "session", 2, 60)

    with pytest.raises(SendingLimitReached) as caught:
        EmailBackend().send_messages(batch(3))

    message = str(caught.value)
    assert "already has 2 SMTP sessions open" in message and "MAX_SESSIONS" in message
    assert "LIMIT_WAIT" in message and "try again later" in message
    assert caught.value.sent == 0 and len(caught.value.failures) == 3
    assert xoauth2_smtp_server.auth_attempts == [] and xoauth2_smtp_server.messages == []


def test_a_slot_left_by_a_dead_process_frees_itself(capped, mailbox, xoauth2_smtp_server):
    capped["LIMIT_WAIT"] = 30
    held_elsewhere(mailbox, "session", 2, 0.5)  # its holder stopped renewing

    assert EmailBackend().send_messages(batch(1)) == 1
    # Closed after the call: the slot is free again, not left to expire.
    ours = SendingLease.objects.filter(mailbox=mailbox, kind="session").exclude(holder=OTHER)
    assert list(ours.values_list("holder", flat=True)) == [""]


def test_send_permits_used_by_other_processes_hold_a_send_back(
    capped, mailbox, xoauth2_smtp_server
):
    capped["PROVIDERS"]["oauth2"]["RATE_LIMIT"] = 2
    held_elsewhere(mailbox, "send", 2, 60)

    with pytest.raises(SendingLimitReached) as caught:
        EmailBackend().send_messages(batch(2))

    message = str(caught.value)
    assert "already sent 2 messages in the last 60 s" in message and "RATE_LIMIT" in message
    assert xoauth2_smtp_server.messages == []
    # When room is expected, for a task queue to defer (kept across processes).
    copy = pickle.loads(pickle.dumps(caught.value))
    assert isinstance(copy, SendingLimitReached) and copy.retry_after is not None
    assert 50 < copy.retry_after <= 60


def test_a_throttled_mailbox_does_not_hold_back_another(
    capped, mailbox, oauth2_server, xoauth2_smtp_server
):
    capped["PROVIDERS"]["oauth2"]["RATE_LIMIT"] = 2
    make_mailbox(oauth2_server, "second@example.com")
    held_elsewhere(mailbox, "send", 2, 60)

    with pytest.raises(SendError) as caught:
        EmailBackend().send_messages(
            [*batch(1), *batch(2, "second@example.com", "S"), *batch(1, prefix="N")]
        )

    assert caught.value.sent == 2
    assert {f.index for f in caught.value.failures} == {0, 3}
    assert {m.mail_from for m in xoauth2_smtp_server.messages} == {"second@example.com"}


def test_a_backend_rate_limit_stays_within_the_shared_cap(
    monkeypatch, capped, mailbox, xoauth2_smtp_server
):
    monkeypatch.setattr(limits, "WINDOW", 0.5)  # a short "minute"
    capped["PROVIDERS"]["oauth2"]["RATE_LIMIT"] = 2
    capped["LIMIT_WAIT"] = 30

    assert EmailBackend(rate_limit=100).send_messages(batch(5)) == 5

    times = sorted(m.received_at for m in xoauth2_smtp_server.messages)
    for first, third in zip(times, times[2:], strict=False):
        # SQLite's clock has millisecond steps: allow one.
        assert (third - first).total_seconds() >= 0.5 - 0.002


def test_extra_sessions_only_where_slots_are_free(capped, mailbox, xoauth2_smtp_server):
    capped["PROVIDERS"]["oauth2"]["MAX_SESSIONS"] = 3
    held_elsewhere(mailbox, "session", 2, 60)

    assert EmailBackend(max_connections=3).send_messages(batch(6)) == 6
    assert len(xoauth2_smtp_server.auth_attempts) == 1  # one free slot: one session


def test_a_kept_alive_session_keeps_its_slot_renewed_until_closed(
    capped, mailbox, xoauth2_smtp_server
):
    capped["PROVIDERS"]["oauth2"]["MAX_SESSIONS"] = 1
    capped["SESSION_LEASE"] = 0.6  # renewed every 0.2 s

    assert EmailBackend(keep_alive=30).send_messages(batch(1)) == 1
    time.sleep(1.5)  # well past one lease: only renewals keep it

    assert leases.try_take(mailbox.pk, "session", 1, OTHER, 60).number is None
    mail_loop.run(pool.close_all())
    assert leases.try_take(mailbox.pk, "session", 1, OTHER, 60).number == 0


def test_an_idle_kept_alive_session_gives_its_slot_to_a_waiting_process(
    capped, mailbox, xoauth2_smtp_server
):
    capped["PROVIDERS"]["oauth2"]["MAX_SESSIONS"] = 1
    assert EmailBackend(keep_alive=60).send_messages(batch(1)) == 1
    assert leases.try_take(mailbox.pk, "session", 1, OTHER, 60).number is None

    leases.want(mailbox.pk, 30)  # another process waits for the slot

    deadline = time.monotonic() + 15
    while leases.try_take(mailbox.pk, "session", 1, OTHER, 60).number is None:
        assert time.monotonic() < deadline, "the idle session kept its slot"
        time.sleep(0.1)
    assert pool.idle_count() == 0


def test_a_waiting_send_asks_idle_sessions_elsewhere_for_a_slot(
    capped, mailbox, xoauth2_smtp_server
):
    capped["LIMIT_WAIT"] = 0.3
    held_elsewhere(mailbox, "session", 2, 60)

    with pytest.raises(SendingLimitReached):
        EmailBackend().send_messages(batch(1))

    assert leases.wanted([mailbox.pk]) == {mailbox.pk}


def test_a_session_that_lost_its_slot_takes_another(capped, mailbox, xoauth2_smtp_server):
    capped["SESSION_LEASE"] = 0.6
    assert EmailBackend(keep_alive=30).send_messages(batch(1)) == 1
    # Its renewals stalled long enough for another process to take the slot.
    SendingLease.objects.filter(mailbox=mailbox, kind="session", number=0).update(
        holder=OTHER, expires_at=Now() + dt.timedelta(seconds=60)
    )
    time.sleep(0.5)  # a renewal notices

    assert EmailBackend(keep_alive=30).send_messages(batch(1, prefix="N")) == 1

    assert len(xoauth2_smtp_server.auth_attempts) == 2  # stopped and logged in again
    holders = dict(
        SendingLease.objects.filter(mailbox=mailbox, kind="session").values_list("number", "holder")
    )
    assert holders[0] == OTHER and holders[1] not in ("", OTHER)


def test_sending_inside_a_transaction_that_wrote(capped, mailbox, xoauth2_smtp_server):
    """PostgreSQL: the limits are written on another connection. SQLite, where another
    connection could not write while this transaction holds the write lock: on this one."""
    with transaction.atomic():
        Mailbox.objects.filter(pk=mailbox.pk).update(last_error="")  # holds SQLite's lock
        assert EmailBackend().send_messages(batch(2)) == 2
    assert len(xoauth2_smtp_server.messages) == 2


def test_mailboxes_without_limits_touch_no_limits_table(mailbox, xoauth2_smtp_server):
    assert EmailBackend(max_connections=2).send_messages(batch(4)) == 4
    assert not SendingLease.objects.exists()


# System checks E055-E058. -----------------------------------------------------


def check_ids(settings: Any, xoauth2_mail: dict[str, Any]) -> set[str]:
    settings.XOAUTH2_MAIL = xoauth2_mail
    return {message.id for message in run_checks() if message.id}


@pytest.mark.parametrize("value", [0, -1, "30", 2.5, True, 40000])
def test_check_e055_rate_limit(settings, value):
    providers = {"oauth2": {"CLIENT_ID": "x", "TOKEN_URL": "https://t", "RATE_LIMIT": value}}
    assert "xoauth2_mail.E055" in check_ids(settings, {"PROVIDERS": providers})


@pytest.mark.parametrize("value", [0, "3", 1.5, False])
def test_check_e056_max_sessions(settings, value):
    providers = {"microsoft": {"CLIENT_ID": "x", "MAX_SESSIONS": value}}
    assert "xoauth2_mail.E056" in check_ids(settings, {"PROVIDERS": providers})


@pytest.mark.parametrize("value", [0, -5, "60", None])
def test_check_e057_limit_wait(settings, value):
    assert "xoauth2_mail.E057" in check_ids(settings, {"LIMIT_WAIT": value})


@pytest.mark.parametrize("value", [1, 4.9, "60", None])
def test_check_e058_session_lease(settings, value):
    assert "xoauth2_mail.E058" in check_ids(settings, {"SESSION_LEASE": value})


def test_checks_accept_good_limits(settings):
    providers = {"microsoft": {"CLIENT_ID": "x", "RATE_LIMIT": None, "MAX_SESSIONS": 2}}
    ids = check_ids(settings, {"PROVIDERS": providers, "LIMIT_WAIT": 10, "SESSION_LEASE": 30})
    assert not ids & {"xoauth2_mail.E055", "xoauth2_mail.E056", "xoauth2_mail.E057"}
    assert "xoauth2_mail.E058" not in ids and "xoauth2_mail.W002" not in ids
