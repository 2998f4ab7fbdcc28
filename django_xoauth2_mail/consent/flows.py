"""Provider-neutral steps of a consent flow, shared by the connect_mailbox
command and the admin: PKCE and state, and saving the result on a Mailbox."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from django_xoauth2_mail import tokens
from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.exceptions import EncryptionKeyError, XOAuth2MailError
from django_xoauth2_mail.models import Mailbox, MailboxStatus, normalize_address
from django_xoauth2_mail.providers import get_provider
from django_xoauth2_mail.providers.base import ConsentResult, Provider
from django_xoauth2_mail.tokens import TOKEN_FIELDS


class ConsentError(XOAuth2MailError):
    """A consent flow ended without a usable grant (denied, wrong state, mismatch ...)."""


@dataclass(frozen=True)
class PKCEPair:
    verifier: str
    challenge: str  # S256


def make_pkce_pair() -> PKCEPair:
    verifier = secrets.token_urlsafe(64)  # 86 characters, inside RFC 7636's 43-128
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return PKCEPair(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"))


def make_state() -> str:
    return secrets.token_urlsafe(32)


def check_state(expected: str | None, received: str | None) -> None:
    if not expected or not received or not secrets.compare_digest(expected, received):
        raise ConsentError(
            "The consent answer does not belong to this request (state mismatch). Start "
            "the connection again; if it keeps happening, someone may be replaying an old link."
        )


def check_issuer(provider: Provider, iss: str | None) -> None:
    """Refuse an authorization response another server sent (RFC 9207, mix-up).

    ``iss``, when present, must be ``provider``'s issuer; where that issuer is not known
    here, it must at least not be the issuer of another configured provider (a malicious
    server bouncing the person to an honest one, to be sent the honest server's code).
    A server that always sends ``iss`` must have sent it.
    """
    if iss is None:
        if provider.requires_iss:
            raise ConsentError(
                f"The answer does not say which server sent it (no iss parameter), but "
                f"{provider.name} ({provider.id}) always does, so it did not come from "
                f"{provider.id}. Nothing was saved; start the connection again."
            )
        return
    expected = provider.issuer
    if expected is not None and iss == expected:
        return
    if expected is None and not any(iss == other.issuer for other in _other_providers(provider)):
        return
    raise ConsentError(
        f"The answer was sent by {iss}, but the connection was started with {provider.name} "
        f"({provider.id}){f', which is {expected}' if expected else ''}. Nothing was saved. "
        "One configured authorization server may be redirecting consents to another "
        "(an OAuth mix-up attack): check each provider's settings before trying again."
    )


def _other_providers(provider: Provider) -> list[Provider]:
    others = []
    for provider_id in conf.PROVIDERS:
        if provider_id == provider.id:
            continue
        try:
            others.append(get_provider(provider_id))
        except (XOAuth2MailError, ImportError):
            continue  # a broken entry is the system checks' business, not this answer's
    return others


@sensitive_variables()
def resolve_email(result: ConsentResult, requested: str | None) -> str:
    """The mailbox address: the provider's, checked against the one asked for."""
    told = normalize_address(result.email) if result.email else None
    asked = normalize_address(requested) if requested else None
    if told and asked and told != asked:
        raise ConsentError(
            f"You asked to connect {asked}, but the provider's consent was given by {told}. "
            f"Sign in as {asked} at the provider, or connect {told} instead."
        )
    email = told or asked
    if not email:
        raise ConsentError(
            "The provider did not say which account consented; give it with --email (or in "
            "the admin form)."
        )
    return email


@sensitive_variables()
def save_consent(provider_id: str, result: ConsentResult, requested_email: str | None) -> Mailbox:
    """Create or re-authorise the Mailbox, clearing any reconnect-required flag."""
    email = resolve_email(result, requested_email)
    with transaction.atomic():
        # The old tokens are read only if needed, and may not decrypt (SECRET_KEY
        # changed): a consent replaces them all the same.
        found = tokens.locked_mailbox(email=email, defer=TOKEN_FIELDS)
        mailbox = found or Mailbox(email=email)
        mailbox.provider = provider_id
        mailbox.access_token = result.access_token
        mailbox.access_token_expires_at = result.expires_at
        if result.refresh_token or not _stored_refresh_token(mailbox):
            mailbox.refresh_token = result.refresh_token
        mailbox.scopes = " ".join(result.scopes)
        # Who consented, as the provider names the account (Microsoft: tenant/object id).
        mailbox.account_id = result.account_id or mailbox.account_id
        mailbox.status = MailboxStatus.CONNECTED
        mailbox.last_error = ""
        mailbox.last_error_at = None
        mailbox.last_refreshed_at = timezone.now()
        mailbox.token_version += 1
        mailbox.save()
    return mailbox


@sensitive_variables()
def _stored_refresh_token(mailbox: Mailbox) -> str | None:
    try:
        return mailbox.refresh_token
    except EncryptionKeyError:
        return None


Say = Callable[[str], None]  # prints one line for the person, at once


def as_clause(exc: BaseException) -> str:
    """An exception's message, fit to sit inside a sentence."""
    return str(exc).strip().rstrip(".")
