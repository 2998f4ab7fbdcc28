"""The database side of the shared limits (sending/limits.py): short, single-statement
writes on ``SendingLease`` rows, each in autocommit on a connection of its own.

A mailbox has ``cap`` rows of each kind, numbered from 0, created on first need.
Taking a row is a conditional UPDATE (``WHERE expires_at <= now``): when two
processes race for the same free row, the database lets one UPDATE match and the
other finds nothing and tries the next row. No row lock is held across network
I/O and no transaction stays open, so a caller inside ``transaction.atomic``
never waits for itself. Every time is the database's clock (``NOW()``), so
machines whose clocks disagree still count the same window.

These functions block: call them from limits.py's executor, never on the loop.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from django.db import IntegrityError, router
from django.db.models import DurationField, ExpressionWrapper, F, Min, QuerySet
from django.db.models.functions import Now

from django_xoauth2_mail.models import SendingLease


@dataclass(frozen=True)
class Attempt:
    """What one try found: the number of the row taken, or how long until one frees."""

    number: int | None
    retry_in: float = 0.0


def _leases() -> QuerySet[SendingLease]:
    # The write database even for reads: a replica could show a row as free.
    return SendingLease.objects.using(router.db_for_write(SendingLease))


def try_take(mailbox_id: int, kind: str, cap: int, holder: str, hold: float) -> Attempt:
    """Take a free row among the first ``cap`` of this mailbox and kind, for ``hold`` s."""
    rows = _leases().filter(mailbox_id=mailbox_id, kind=kind, number__lt=cap)
    free = rows.filter(expires_at__lte=Now()).order_by("number").values_list("pk", "number")
    for pk, number in free:
        taken = rows.filter(pk=pk, expires_at__lte=Now()).update(
            holder=holder, expires_at=Now() + dt.timedelta(seconds=hold)
        )
        if taken:
            return Attempt(number)
    missing = sorted(set(range(cap)) - set(rows.values_list("number", flat=True)))
    for number in missing:
        try:
            _leases().create(
                mailbox_id=mailbox_id,
                kind=kind,
                number=number,
                holder=holder,
                expires_at=Now() + dt.timedelta(seconds=hold),
            )
        except IntegrityError:
            continue  # another process created (and so took) it first
        return Attempt(number)
    soonest = rows.aggregate(
        wait=Min(ExpressionWrapper(F("expires_at") - Now(), output_field=DurationField()))
    )["wait"]
    return Attempt(None, max(0.0, soonest.total_seconds()) if soonest is not None else 0.0)


def extend(mailbox_id: int, kind: str, number: int, holder: str, seconds: float) -> bool:
    """Make the row expire ``seconds`` from now, if ``holder`` still holds it."""
    return bool(
        _leases()
        .filter(mailbox_id=mailbox_id, kind=kind, number=number, holder=holder)
        .update(expires_at=Now() + dt.timedelta(seconds=seconds))
    )


def release(mailbox_id: int, kind: str, number: int, holder: str) -> None:
    """Free the row now, if ``holder`` still holds it."""
    _leases().filter(mailbox_id=mailbox_id, kind=kind, number=number, holder=holder).update(
        holder="", expires_at=Now()
    )


def renew(held: Iterable[tuple[int, str]], seconds: float) -> set[str]:
    """Extend every session row still held by one of these (mailbox id, holder) pairs;
    return the holders that still held theirs (the others lost it to an expiry)."""
    held = list(held)
    mailbox_ids = {mailbox_id for mailbox_id, _ in held}
    holders = {holder for _, holder in held}
    rows = _leases().filter(
        mailbox_id__in=mailbox_ids, kind=SendingLease.Kind.SESSION, holder__in=holders
    )
    if rows.update(expires_at=Now() + dt.timedelta(seconds=seconds)) == len(holders):
        return holders
    return set(rows.values_list("holder", flat=True))


def want(mailbox_id: int, seconds: float) -> None:
    """Say, for ``seconds``, that a process waits for one of this mailbox's session slots."""
    demand = _leases().filter(mailbox_id=mailbox_id, kind=SendingLease.Kind.DEMAND, number=0)
    if demand.update(expires_at=Now() + dt.timedelta(seconds=seconds)):
        return
    with contextlib.suppress(IntegrityError):  # another waiter said it at the same moment
        _leases().create(
            mailbox_id=mailbox_id,
            kind=SendingLease.Kind.DEMAND,
            number=0,
            expires_at=Now() + dt.timedelta(seconds=seconds),
        )


def wanted(mailbox_ids: Iterable[int]) -> set[int]:
    """The mailboxes, among these, for which some process waits for a session slot."""
    return set(
        _leases()
        .filter(
            mailbox_id__in=list(mailbox_ids),
            kind=SendingLease.Kind.DEMAND,
            expires_at__gt=Now(),
        )
        .values_list("mailbox_id", flat=True)
    )
