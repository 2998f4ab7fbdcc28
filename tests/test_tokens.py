"""The token cache's freshness rule."""

from __future__ import annotations

import datetime as dt

from django.utils import timezone

from django_xoauth2_mail.models import Mailbox


def mailbox_with(lifetime: float, age: float) -> Mailbox:
    now = timezone.now()
    refreshed = now - dt.timedelta(seconds=age)
    return Mailbox(
        access_token="token",
        last_refreshed_at=refreshed,
        access_token_expires_at=refreshed + dt.timedelta(seconds=lifetime),
    )


def test_a_token_is_fresh_until_skew_seconds_before_expiry():
    assert mailbox_with(lifetime=3600, age=3200).access_token_is_fresh(300)
    assert not mailbox_with(lifetime=3600, age=3400).access_token_is_fresh(300)


def test_a_short_lived_token_is_not_stale_from_birth():
    # 120 s tokens with the default 300 s skew: fresh for the first half of their life.
    assert mailbox_with(lifetime=120, age=1).access_token_is_fresh(300)
    assert not mailbox_with(lifetime=120, age=61).access_token_is_fresh(300)


def test_no_token_or_no_expiry_is_never_fresh():
    assert not Mailbox(access_token=None).access_token_is_fresh(300)
    assert not Mailbox(access_token="t", access_token_expires_at=None).access_token_is_fresh(300)
