"""Turns an SMTP authentication refusal into a message that says what to do."""

from __future__ import annotations

from typing import Any

from django_xoauth2_mail.providers.base import SMTPEndpoint
from django_xoauth2_mail.sending.sasl import describe_challenge

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
    (
        454,
        "4.7.0",
        "The server could not check the token right now (temporary): try again later.",
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
) -> str:
    text = (
        f"The SMTP server {endpoint.host}:{endpoint.port} refused {mechanism} authentication "
        f"for {username} with {code} {message.strip()}"
    )
    text += describe_challenge(challenge)
    text += ", after one token refresh and retry."
    for hint_code, fragment, hint in HINTS:
        if code == hint_code and fragment in message:
            return f"{text} {hint}"
    if code == 454:
        return f"{text} The failure is temporary: try again later."
    return f"{text} Reconnect the mailbox if the problem persists."
