"""Takes the secrets a request carried out of the text a provider sent back.

A token endpoint, or a proxy in front of it, may echo the request in its error text
(``error_description``, an HTML error page, msal's or google-auth's messages built from
them). That text becomes an exception message, a log line and ``Mailbox.last_error``, so
every provider path runs it through :func:`scrub` with the secrets it sent (refresh
token, client secret, authorization code, PKCE verifier, device code, service-account
assertion) before raising. The token layer adds the mailbox's own tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus

from django.views.decorators.debug import sensitive_variables

REDACTED = "[redacted]"
# Shorter strings are no credential a provider issues, and replacing every occurrence
# of them would garble the message.
MIN_SECRET_LENGTH = 6
# Request fields (OAuth2 forms: RFC 6749, 7636, 7523, 8628) whose values are secrets.
SECRET_FIELDS = frozenset(
    {
        "access_token",
        "assertion",
        "client_assertion",
        "client_secret",
        "code",
        "code_verifier",
        "device_code",
        "password",
        "refresh_token",
        "token",
    }
)


@sensitive_variables()
def form_secrets(form: Mapping[str, Any] | str | bytes | None) -> set[str]:
    """The secret values of a request form, given as a mapping or as its urlencoded body."""
    if form is None:
        return set()
    if isinstance(form, bytes):
        form = form.decode("utf-8", "replace")
    pairs = parse_qsl(form) if isinstance(form, str) else [(k, v) for k, v in form.items()]
    return {str(value) for key, value in pairs if key in SECRET_FIELDS and value}


@sensitive_variables()
def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every secret replaced, as sent and as an echo would encode it."""
    known = {secret for secret in secrets if secret and len(secret) >= MIN_SECRET_LENGTH}
    # Longest first: a secret that contains another is replaced whole.
    for secret in sorted(known, key=len, reverse=True):
        for form in sorted(_spellings(secret), key=len, reverse=True):
            text = text.replace(form, REDACTED)
    return text


@sensitive_variables()
def scrub_payload(payload: Mapping[str, Any], secrets: Iterable[str | None]) -> dict[str, Any]:
    """An error answer with every text value scrubbed (``error``, ``error_description`` ...)."""
    secrets = list(secrets)
    return {
        key: scrub(value, secrets) if isinstance(value, str) else value
        for key, value in payload.items()
    }


def _spellings(secret: str) -> set[str]:
    # As sent, form-encoded (both ways), JSON-escaped (with and without "\/").
    escaped = json.dumps(secret)[1:-1]
    return {
        secret,
        quote_plus(secret),
        quote(secret, safe=""),
        escaped,
        escaped.replace("/", "\\/"),
    }
