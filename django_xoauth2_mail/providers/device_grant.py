"""The client side of the OAuth 2.0 device authorization grant (RFC 8628), for
providers configured by URLs (``oauth2``, and ``dev`` through it).

Microsoft's adapter uses msal's implementation instead. A provider calls :func:`start`
and, once the person has been told the code, :func:`poll`; both report failures with
the provider interface's exceptions, so callers handle them as any other consent step.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import requests
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.exceptions import ConfigurationError
from django_xoauth2_mail.providers.base import (
    ConsentResult,
    DeviceFlow,
    DeviceFlowDenied,
    DeviceFlowExpired,
    TokenEndpointError,
    expiry_from,
    json_object,
)
from django_xoauth2_mail.providers.scrub import form_secrets, scrub_payload

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 section 3.2: the interval when the server names none; section 3.5: what each
# slow_down adds to it, for good.
DEFAULT_INTERVAL = 5.0
SLOW_DOWN_STEP = 5.0
# A server that asks for no wait at all must not get a busy loop.
MIN_INTERVAL = 1.0
# Section 3.5 asks for exponential back-off after a connection timeout; this caps it.
MAX_BACKOFF = 60.0


@sensitive_variables()
def start(url: str, scopes: Sequence[str], client_auth: Mapping[str, str]) -> DeviceFlow:
    """Ask the device authorization endpoint for a user code (RFC 8628 section 3.1)."""
    if not url:
        raise ConfigurationError(
            "The provider has no device authorization endpoint: set its "
            "DEVICE_AUTHORIZATION_URL in XOAUTH2_MAIL['PROVIDERS'], or connect with the "
            "loopback flow (connect_mailbox without --device)."
        )
    status, payload = _post(url, {"scope": " ".join(scopes), **client_auth})
    fields = ("device_code", "user_code", "verification_uri", "expires_in")
    if status != 200 or "error" in payload or not all(payload.get(f) for f in fields):
        raise TokenEndpointError(
            f"the device authorization endpoint {url} did not start a device flow "
            f"({_detail(payload, status)})",
            retryable=status >= 500,
        )
    uri, user_code = str(payload["verification_uri"]), str(payload["user_code"])
    return DeviceFlow(
        verification_uri=uri,
        user_code=user_code,
        expires_at=expiry_from(payload["expires_in"]),
        message=f"To sign in, open {uri} and enter the code {user_code}.",
        state={
            "device_code": str(payload["device_code"]),
            "interval": _interval(payload.get("interval")),
            "verification_uri_complete": str(payload.get("verification_uri_complete") or ""),
        },
    )


class Clock(Protocol):
    """Where polling reads the time and waits: the ``time`` module, or a test's own."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float, /) -> None: ...


@sensitive_variables()
def poll(
    token_url: str,
    flow: DeviceFlow,
    client_auth: Mapping[str, str],
    *,
    timeout: float,
    clock: Clock = time,
) -> dict[str, Any]:
    """Poll the token endpoint until the person approved; return its token response.

    Waits the server's interval before each request (section 3.5). Raises
    DeviceFlowDenied, DeviceFlowExpired (the code expired, or ``timeout`` seconds
    passed), or TokenEndpointError for any other refusal.
    """
    seconds_left = (flow.expires_at - timezone.now()).total_seconds()
    deadline = clock.monotonic() + min(timeout, seconds_left)
    interval = float(flow.state.get("interval", DEFAULT_INTERVAL))
    data = {"grant_type": GRANT_TYPE, "device_code": str(flow.state["device_code"])}
    while clock.monotonic() + interval <= deadline:
        clock.sleep(interval)
        try:
            status, payload = _post(token_url, data | dict(client_auth))
        except TokenEndpointError as exc:
            if not exc.retryable:
                raise
            interval = min(interval * 2, MAX_BACKOFF)
            continue
        error = payload.get("error")
        if status == 200 and not error and isinstance(payload.get("access_token"), str):
            return payload
        if error == "slow_down":
            interval += SLOW_DOWN_STEP
        elif error != "authorization_pending":
            raise _refusal(token_url, flow, payload, status)
    raise DeviceFlowExpired(_expired_message(flow), retryable=False)


@sensitive_variables()
def consent_result(payload: Mapping[str, Any], email: str | None) -> ConsentResult:
    """The ConsentResult for a token response that :func:`poll` returned."""
    return ConsentResult(
        email=email,
        access_token=str(payload["access_token"]),
        expires_at=expiry_from(payload.get("expires_in")),
        refresh_token=payload.get("refresh_token") or None,
        scopes=tuple(str(payload.get("scope", "")).split()),
    )


def _interval(value: Any) -> float:
    try:
        return max(float(value), MIN_INTERVAL)
    except (TypeError, ValueError):
        return DEFAULT_INTERVAL


def _refusal(
    url: str, flow: DeviceFlow, payload: Mapping[str, Any], status: int
) -> TokenEndpointError:
    if payload.get("error") == "access_denied":
        return DeviceFlowDenied(
            f"the sign-in for code {flow.user_code} was refused at {flow.verification_uri} "
            "(access_denied)",
            retryable=False,
        )
    if payload.get("error") == "expired_token":
        return DeviceFlowExpired(_expired_message(flow), retryable=False)
    return TokenEndpointError(
        f"the token endpoint {url} refused the device code ({_detail(payload, status)})",
        retryable=False,
    )


def _expired_message(flow: DeviceFlow) -> str:
    return f"nobody entered the code {flow.user_code} at {flow.verification_uri} in time"


def _detail(payload: Mapping[str, Any], status: int) -> str:
    error = str(payload.get("error") or f"HTTP {status}")
    description = payload.get("error_description")
    return f"{error}: {description}" if description else error


@sensitive_variables()
def _post(url: str, data: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """POST a form; (HTTP status, JSON object). Errors never quote the form (secrets)."""
    try:
        response = requests.post(url, data=dict(data), timeout=conf.HTTP_TIMEOUT)
    except requests.RequestException as exc:
        raise TokenEndpointError(
            f"{url} could not be reached ({type(exc).__name__})", retryable=True
        ) from None
    payload = json_object(
        url, response.status_code, response.text, check="the provider's URL settings"
    )
    if response.status_code != 200 or "error" in payload:
        # Refusals reach messages; an endpoint may echo the request in them.
        payload = scrub_payload(payload, form_secrets(data))
    return response.status_code, payload
