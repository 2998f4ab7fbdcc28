"""``connect_mailbox --device``: the device authorization grant (RFC 8628) seen from the
command line. The provider runs the protocol (``providers/device_grant.py``, or msal for
Microsoft); this module tells the person what to do and turns failures into one clear line.
"""

from __future__ import annotations

from django.utils import timezone

from django_xoauth2_mail.consent.flows import ConsentError, Say, as_clause
from django_xoauth2_mail.providers.base import (
    ConsentResult,
    DeviceFlowDenied,
    DeviceFlowExpired,
    GrantRevoked,
    Provider,
    TokenEndpointError,
)

# The device flow --------------------------------------------------------------------


def consent_by_device(provider: Provider, timeout: float, say: Say) -> ConsentResult:
    """RFC 8628: show a code to enter at the provider's page, poll until it is done."""
    try:
        flow = provider.start_device_flow()
    except (GrantRevoked, TokenEndpointError) as exc:
        hint = provider.unreachable_hint if getattr(exc, "retryable", False) else ""
        raise ConsentError(
            f"{provider.name} did not start the device sign-in ({as_clause(exc)}). Nothing was "
            "saved; fix that and run the command again, or connect with --loopback."
            + (f" {hint}" if hint else "")
        ) from None
    say("Open this address in a browser on any device:")
    say("")
    say(flow.verification_uri)
    say("")
    say(f"enter the code {flow.user_code}, sign in with the account that should send mail")
    say("and allow access.")
    complete = flow.state.get("verification_uri_complete")
    if complete:
        say(f"(Or open {complete}, which has the code filled in.)")
    left = (flow.expires_at - timezone.now()).total_seconds()
    say(f"Waiting up to {max(0, min(timeout, left)):.0f} s for the sign-in (Ctrl-C cancels).")
    try:
        return provider.finish_device_flow(flow, timeout=timeout)
    except DeviceFlowDenied:
        raise ConsentError(
            f"The sign-in with code {flow.user_code} was refused (access_denied). Nothing "
            "was saved. To connect the mailbox, run the command again and allow access."
        ) from None
    except (GrantRevoked, TokenEndpointError) as exc:
        hint = " with a longer --timeout" if isinstance(exc, DeviceFlowExpired) else ""
        raise ConsentError(
            f"The device sign-in did not finish ({as_clause(exc)}). Nothing was saved; run "
            f"the command again{hint}."
        ) from None
