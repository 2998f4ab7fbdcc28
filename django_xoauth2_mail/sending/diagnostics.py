"""Turns an SMTP authentication refusal into a message that says what to do."""

from __future__ import annotations

from typing import Any

from django_xoauth2_mail.providers.base import SMTPEndpoint
from django_xoauth2_mail.sending.sasl import describe_challenge
from django_xoauth2_mail.sending.transaction import TRANSIENT_CODES

# (reply code, enhanced status or text fragment) -> what usually causes it.
HINTS: tuple[tuple[int, str, str], ...] = (
    (
        535,
        "5.7.139",
        "SMTP AUTH is disabled for this Microsoft 365 mailbox or tenant: enable "
        "'Authenticated SMTP' for the mailbox (Microsoft 365 admin center > Users > Mail > "
        "Manage email apps) or run `Set-CASMailbox -Identity <address> "
        "-SmtpClientAuthenticationDisabled $false`.",
    ),
    (
        535,
        "5.7.3",
        "Microsoft refused the token: check that the app has the SMTP.Send permission "
        "(or SMTP.SendAsApp with mailbox access for app-only sending) and that the "
        "address is the mailbox the token was issued for.",
    ),
    (
        535,
        # Gmail's wording: other servers (Dovecot) also answer 5.7.8, for other reasons.
        "5.7.8 Username and Password not accepted",
        "Google refused the token: check that the mailbox was connected with the "
        "https://mail.google.com/ scope and that the address is the account that consented.",
    ),
)


def explain_auth_failure(
    username: str,
    endpoint: SMTPEndpoint,
    code: int,
    message: str,
    challenge: dict[str, Any] | None,
    *,
    mechanism: str = "XOAUTH2",
    refreshed: bool,
    temporary_refusals: int = 0,
) -> str:
    """What the refusal says, what was tried (truthfully), and what to do."""
    text = (
        f"The SMTP server {endpoint.host}:{endpoint.port} refused {mechanism} authentication "
        f"for {username} with {code} {message.strip()}"
    )
    text += describe_challenge(challenge)
    if code in TRANSIENT_CODES:
        # "Not now", not "no" (RFC 4954: 454 4.7.0 is a temporary authentication failure).
        retries = temporary_refusals - 1
        return (
            f"{text}: the server could not check the token right now (a temporary "
            f"failure). It answered so to {temporary_refusals} login attempt(s) in a row: "
            f"the login was retried {retries} time(s), after the waits in "
            "XOAUTH2_MAIL['SMTP_RETRY_DELAYS']. A temporary failure is no verdict on the "
            "token: it was not refreshed for it, and the mailbox was not flagged. Send "
            "again later; if it persists, check the provider's status page."
        )
    text += ", after one token refresh and retry." if refreshed else "."
    for hint_code, fragment, hint in HINTS:
        if code == hint_code and fragment in message:
            return f"{text} {hint}"
    return f"{text} Reconnect the mailbox if the problem persists."
