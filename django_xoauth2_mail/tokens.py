"""The access-token lifecycle: use the cached token, or refresh it once.

A refresh happens under two locks: a per-mailbox ``threading.Lock`` (threads
of this process queue up instead of hitting the database) and the Mailbox
row lock (``select_for_update``, which other processes and machines respect).
Whoever gets the locks second finds the token already refreshed and uses it,
so N concurrent senders with an expired token cause one refresh. The lock is
a database row lock, so it dies with the transaction if the process dies.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from django.db import connections, router, transaction
from django.db.models import F
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from django_xoauth2_mail import signals
from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.exceptions import (
    EncryptionKeyError,
    MailboxDisconnected,
    MailboxNotFound,
    MailboxReconnectRequired,
    TokenRefreshError,
    XOAuth2MailError,
)
from django_xoauth2_mail.models import Mailbox, MailboxStatus
from django_xoauth2_mail.providers import get_provider, get_provider_class
from django_xoauth2_mail.providers.base import GrantRevoked, TokenEndpointError, TokenResult
from django_xoauth2_mail.providers.scrub import scrub

logger = logging.getLogger(__name__)

_thread_locks: defaultdict[int, threading.Lock] = defaultdict(threading.Lock)
_thread_locks_guard = threading.Lock()


def _new_locks_after_fork() -> None:
    # A lock held by one of the parent's threads at fork() would stay held for
    # ever in the child, where that thread does not exist.
    global _thread_locks_guard
    _thread_locks_guard = threading.Lock()
    _thread_locks.clear()


os.register_at_fork(after_in_child=_new_locks_after_fork)

# Seconds to wait before each retry of a refresh that failed for a temporary reason.
RETRY_BACKOFF = (0.5, 2.0, 5.0)


def _thread_lock(mailbox_pk: int) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks[mailbox_pk]


def locked_mailbox(
    using: str | None = None, *, defer: Iterable[str] = (), **lookup: object
) -> Mailbox | None:
    """The Mailbox matching ``lookup``, locked against every other writer of its
    tokens until the surrounding ``transaction.atomic`` ends (None if there is none).

    The one way refreshes, consents and wipes take that lock: PostgreSQL's row
    lock; SQLite ignores ``FOR UPDATE``, so there a no-op write takes the
    database write lock, which serialises other processes the same way.
    """
    using = using or router.db_for_write(Mailbox)
    queryset = Mailbox.objects.using(using).filter(**lookup)
    if connections[using].vendor == "sqlite":
        queryset.update(token_version=F("token_version"))
    return queryset.select_for_update().defer(*defer).first()


def ensure_sendable(mailbox: Mailbox) -> None:
    """Fail fast, without a network call, for a mailbox that cannot send."""
    if mailbox.status == MailboxStatus.RECONNECT_REQUIRED:
        raise MailboxReconnectRequired(mailbox.email, mailbox.last_error, provider=mailbox.provider)
    if mailbox.status == MailboxStatus.DISCONNECTED:
        raise MailboxDisconnected(mailbox.email, provider=mailbox.provider)


@sensitive_variables()
def get_access_token(mailbox: Mailbox, *, rejected_token: str | None = None) -> str:
    """A valid access token for ``mailbox``, refreshing it when needed.

    ``rejected_token`` is a token the SMTP server just refused: it is not
    returned again even if it looks fresh. ``mailbox`` is updated in place.
    """
    ensure_sendable(mailbox)
    if _usable(mailbox, rejected_token):
        return mailbox.access_token  # type: ignore[return-value]
    with _thread_lock(mailbox.pk):
        outcome = _refresh_under_row_lock(mailbox, rejected_token)
    return outcome.finish(mailbox)


def _usable(mailbox: Mailbox, rejected_token: str | None) -> bool:
    return mailbox.access_token_is_fresh(conf.TOKEN_REFRESH_SKEW) and (
        rejected_token is None or mailbox.access_token != rejected_token
    )


@dataclass
class _Outcome:
    """What happened under the lock; acted on after the transaction ended
    (signals must not see a transaction that may still roll back)."""

    refreshed: bool = False
    rotated: bool = False
    revoked_detail: str | None = None
    error: TokenRefreshError | None = None

    @sensitive_variables()
    def finish(self, mailbox: Mailbox) -> str:
        if self.revoked_detail is not None:
            signals.mailbox_reconnect_required.send(
                sender=Mailbox, mailbox=mailbox, error=self.revoked_detail
            )
            raise MailboxReconnectRequired(
                mailbox.email, self.revoked_detail, provider=mailbox.provider
            )
        if self.error is not None:
            raise self.error
        ensure_sendable(mailbox)
        if self.refreshed:
            signals.token_refreshed.send(
                sender=Mailbox,
                mailbox=mailbox,
                expires_at=mailbox.access_token_expires_at,
                refresh_token_rotated=self.rotated,
            )
        return mailbox.access_token  # type: ignore[return-value]


@sensitive_variables()
def _refresh_under_row_lock(mailbox: Mailbox, rejected_token: str | None) -> _Outcome:
    using = router.db_for_write(Mailbox, instance=mailbox)
    with transaction.atomic(using=using):
        locked = locked_mailbox(using, pk=mailbox.pk)
        if locked is None:
            raise MailboxNotFound(
                f"The mailbox {mailbox.email} was deleted while mail was being sent from it.",
                mailbox=mailbox.email,
            )
        _copy_token_state(locked, mailbox)
        if locked.status != MailboxStatus.CONNECTED or _usable(locked, rejected_token):
            return _Outcome()  # someone else refreshed, or the mailbox is unusable
        try:
            result = _call_provider(locked)
        except GrantRevoked as exc:
            detail = provider_text(exc, locked)
            _mark_reconnect_required(locked, detail)
            _copy_token_state(locked, mailbox)
            return _Outcome(revoked_detail=detail)
        except TokenEndpointError as exc:
            hint = _unreachable_hint(mailbox) if exc.retryable else ""
            error = TokenRefreshError(
                f"Could not refresh the access token of {mailbox.email}: "
                f"{provider_text(exc, locked)}. "
                "Nothing was sent; try again later, and check the provider's settings "
                f"if it persists.{hint}",
                mailbox=mailbox.email,
            )
            _record_error(locked, str(error))
            return _Outcome(error=error)
        _save_token(locked, result)
        _copy_token_state(locked, mailbox)
        return _Outcome(refreshed=True, rotated=result.refresh_token is not None)


def _unreachable_hint(mailbox: Mailbox) -> str:
    hint = get_provider_class(mailbox.provider).unreachable_hint
    return f" {hint}" if hint else ""


@sensitive_variables()
def _call_provider(mailbox: Mailbox) -> TokenResult:
    provider = get_provider(mailbox.provider, mailbox=mailbox.email)
    attempts = max(1, conf.TOKEN_REFRESH_ATTEMPTS)
    for attempt in range(attempts):
        try:
            return provider.refresh_access_token(mailbox.email, mailbox.refresh_token)
        except TokenEndpointError as exc:
            if not exc.retryable or attempt == attempts - 1:
                raise
            delay = RETRY_BACKOFF[min(attempt, len(RETRY_BACKOFF) - 1)]
            logger.warning(
                "Token refresh for %s failed (%s); retrying in %.1f s",
                mailbox.email,
                provider_text(exc, mailbox),
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


@sensitive_variables()
def provider_text(error: Exception, mailbox: Mailbox) -> str:
    """A provider error's text, safe to raise, log and store in ``last_error``.

    The provider adapters already took out what their request carried; this also
    takes out the mailbox's own tokens, whatever path the text came by.
    """
    return scrub(str(error), [mailbox.refresh_token, mailbox.access_token])


@sensitive_variables()
def _save_token(mailbox: Mailbox, result: TokenResult) -> None:
    now = timezone.now()
    mailbox.access_token = result.access_token
    mailbox.access_token_expires_at = result.expires_at
    if result.refresh_token:
        # Providers that rotate (Microsoft) invalidate the old one: losing
        # this write would lose the mailbox, so it is saved with the token.
        mailbox.refresh_token = result.refresh_token
    if result.scopes:
        mailbox.scopes = " ".join(result.scopes)
    mailbox.last_refreshed_at = now
    mailbox.token_version += 1
    mailbox.save(
        update_fields=[
            "access_token",
            "access_token_expires_at",
            "refresh_token",
            "scopes",
            "last_refreshed_at",
            "token_version",
            "updated_at",
        ]
    )
    logger.info("Refreshed the access token of %s", mailbox.email)


def _mark_reconnect_required(mailbox: Mailbox, detail: str) -> None:
    mailbox.status = MailboxStatus.RECONNECT_REQUIRED
    mailbox.access_token = None
    mailbox.access_token_expires_at = None
    _record_error(
        mailbox, detail, extra_fields=["status", "access_token", "access_token_expires_at"]
    )
    logger.error("Mailbox %s needs to be reconnected: %s", mailbox.email, detail)


def _record_error(mailbox: Mailbox, error: str, extra_fields: list[str] | None = None) -> None:
    mailbox.last_error = error
    mailbox.last_error_at = timezone.now()
    mailbox.save(update_fields=["last_error", "last_error_at", "updated_at", *(extra_fields or [])])


def _copy_token_state(source: Mailbox, target: Mailbox) -> None:
    if source is target:
        return
    for field in (
        "access_token",
        "access_token_expires_at",
        "refresh_token",
        "scopes",
        "status",
        "last_error",
        "last_error_at",
        "last_refreshed_at",
        "token_version",
    ):
        setattr(target, field, getattr(source, field))


# Disconnecting, for the admin and disconnect_mailbox. -----------------------

# The encrypted columns: deferred wherever a row must be handled even if they cannot be
# decrypted (a SECRET_KEY changed without a fallback), and read only when needed.
TOKEN_FIELDS = ("refresh_token", "access_token")


def tokens_readable(mailbox: Mailbox) -> bool:
    """False when the stored tokens cannot be decrypted with the configured keys."""
    try:
        mailbox.refresh_token  # noqa: B018 (loads a deferred field)
        mailbox.access_token  # noqa: B018
    except EncryptionKeyError:
        return False
    return True


@sensitive_variables()
def readable_refresh_token(mailbox: Mailbox) -> str | None:
    """The stored refresh token, or the access token where there is none (either stands
    for the grant when revoking); None when there is none or it cannot be decrypted."""
    try:
        return mailbox.refresh_token or mailbox.access_token
    except EncryptionKeyError:
        return None


@sensitive_variables()
def wipe_tokens(mailbox: Mailbox) -> str | None:
    """Forget the tokens and mark the mailbox disconnected; return the refresh token.

    Under the row lock that token refreshes take, so a refresh running right
    now cannot write a new token back after the wipe (it sees the status).
    """
    with transaction.atomic():
        locked = locked_mailbox(pk=mailbox.pk, defer=TOKEN_FIELDS)
        if locked is None:
            return None
        # Tokens the configured keys cannot read (SECRET_KEY changed) are wiped all the same.
        refresh_token = readable_refresh_token(locked)
        locked.refresh_token = None
        locked.access_token = None
        locked.access_token_expires_at = None
        locked.status = MailboxStatus.DISCONNECTED
        locked.save()
    mailbox.refresh_from_db()
    return refresh_token


@sensitive_variables()
def revoke_at_provider(provider_id: str, refresh_token: str | None) -> bool:
    if not refresh_token:
        return False
    try:
        return get_provider(provider_id).revoke_token(refresh_token)
    except (XOAuth2MailError, TokenEndpointError, OSError):
        return False  # the tokens are gone here either way; the message says what to do


@sensitive_variables()
def delete_and_revoke(mailbox: Mailbox) -> bool:
    """Delete the mailbox and revoke its grant at the provider: True when revoked.

    The tokens are wiped first, under the row lock, so a refresh running now cannot
    leave a live token behind; revocation comes last, as it may be slow or fail.
    """
    refresh_token = wipe_tokens(mailbox)
    mailbox.delete()
    return revoke_at_provider(mailbox.provider, refresh_token)
