"""The device authorization grant (RFC 8628) of the development OAuth2 server.

``OAuth2Server`` holds one :class:`DeviceAuthorizations` and routes three things to it: the
device authorization endpoint, the verification page where a person enters the user code
and clicks Allow or Deny, and the ``device_code`` grant of the token endpoint. This module
knows no HTTP: it returns the JSON bodies and HTML fragments the server wraps, and raises
:class:`DeviceGrantError` for the token endpoint's errors (RFC 8628 section 3.5).

Device codes live in memory only (not in the server's state file): they last minutes, and
a restart in the middle of one sign-in costs nothing but starting it again.
"""

from __future__ import annotations

import html
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

__all__ = ["GRANT_TYPE", "DeviceAuthorizations", "DeviceGrant", "DeviceGrantError"]

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 section 6.1: consonants only (no words, no 0/O or 1/I look-alikes), shown XXXX-XXXX.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
# Section 3.5: each slow_down adds 5 seconds to the interval, for good.
SLOW_DOWN_STEP = 5
# Polls a little early by the clock (timer granularity) are not worth a slow_down.
POLL_TOLERANCE = 0.05


class DeviceGrantError(Exception):
    """An RFC 8628 section 3.5 error for the token endpoint to answer (HTTP 400)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error, self.description = error, description


@dataclass(frozen=True)
class DeviceGrant:
    """An approved device code, redeemed: whom to issue tokens for."""

    email: str
    scope: str


@dataclass
class _DeviceCode:
    client_id: str
    scope: str
    user_code: str
    expires_at: float  # time.time()
    interval: int
    decision: str | None = None  # "allow" or "deny", once the person chose
    email: str | None = None
    last_poll: float | None = None  # time.monotonic() of the previous token request


def normalize_user_code(text: str) -> str:
    """``abcd-efgh``, ``ABCDEFGH`` and ``abcd efgh`` are one code (section 6.1)."""
    letters = "".join(ch for ch in text.upper() if ch.isalpha())
    return f"{letters[:4]}-{letters[4:]}" if len(letters) == USER_CODE_LENGTH else letters


class DeviceAuthorizations:
    """Pending device codes: started by a client, decided by a person, redeemed by polling."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._codes: dict[str, _DeviceCode] = {}  # by device_code

    def start(
        self, client_id: str, scope: str, verification_uri: str, *, interval: int, lifetime: int
    ) -> dict[str, Any]:
        """Register a new device code; the device authorization response (section 3.2)."""
        device_code = secrets.token_urlsafe(32)
        with self._lock:
            user_code = self._new_user_code()
            self._codes[device_code] = _DeviceCode(
                client_id, scope, user_code, time.time() + lifetime, interval
            )
        complete = f"{verification_uri}?{urlencode({'user_code': user_code})}"
        return {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": verification_uri,
            "verification_uri_complete": complete,
            "expires_in": lifetime,
            "interval": interval,
            # Microsoft's endpoint adds instructions ready to print, which msal passes on.
            "message": f"To sign in, open {verification_uri} and enter the code {user_code}.",
        }

    def _new_user_code(self) -> str:
        taken = {record.user_code for record in self._codes.values()}
        while True:
            letters = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
            code = normalize_user_code(letters)
            if code not in taken:
                return code

    def decide(self, user_code: str, decision: str, email: str | None = None) -> bool:
        """Record the person's Allow (with the account) or Deny; False for an unknown,
        expired or already decided code."""
        with self._lock:
            record = self._pending(user_code)
            if record is None:
                return False
            record.decision, record.email = decision, email
            return True

    def _pending(self, user_code: str) -> _DeviceCode | None:
        wanted = normalize_user_code(user_code)
        for record in self._codes.values():
            if record.user_code == wanted:
                undecided = record.decision is None and record.expires_at > time.time()
                return record if undecided else None
        return None

    def redeem(self, device_code: str, client_id: str) -> DeviceGrant:
        """The token endpoint's answer to a poll: the grant, or a DeviceGrantError."""
        if not device_code:
            raise DeviceGrantError("invalid_request", "The device_code parameter is missing.")
        with self._lock:
            record = self._codes.get(device_code)
            if record is None or record.client_id != client_id:
                raise DeviceGrantError(
                    "invalid_grant",
                    "The device code is unknown, already used, or belongs to another client.",
                )
            if record.expires_at <= time.time():
                del self._codes[device_code]
                raise DeviceGrantError(
                    "expired_token", "The device code expired: start the sign-in again."
                )
            self._check_pace(record)
            if record.decision is None:
                raise DeviceGrantError(
                    "authorization_pending", "The person has not entered the code yet."
                )
            del self._codes[device_code]  # single use, whatever the decision
        if record.decision != "allow" or record.email is None:
            raise DeviceGrantError("access_denied", "The person denied the request.")
        return DeviceGrant(record.email, record.scope)

    @staticmethod
    def _check_pace(record: _DeviceCode) -> None:
        now, previous = time.monotonic(), record.last_poll
        record.last_poll = now
        if previous is not None and now - previous < record.interval - POLL_TOLERANCE:
            record.interval += SLOW_DOWN_STEP
            raise DeviceGrantError(
                "slow_down", f"Polling too fast: wait {record.interval} s between requests."
            )

    # The verification page ---------------------------------------------------------

    def page(
        self, method: str, params: dict[str, str], action: str, *, auto_approve: bool = False
    ) -> tuple[int, str, str]:
        """The verification page's answer to GET or POST: (HTTP status, title, body HTML).

        With ``auto_approve``, a GET that names the code and the account (``login_hint``
        or ``email``) allows at once, as the authorization endpoint does.
        """
        user_code = params.get("user_code", "")
        email = params.get("email") or params.get("login_hint", "")
        decision = params.get("decision") if method == "POST" else None
        if method == "GET" and auto_approve and user_code and "@" in email:
            decision = "allow"
        if decision is None:
            return 200, "Connect a device", _form(action, user_code, email)
        if decision == "allow" and "@" not in email:
            return 400, "Connect a device", _form(action, user_code, email, "Enter the address.")
        if not self.decide(user_code, "allow" if decision == "allow" else "deny", email or None):
            problem = "This code is unknown, expired or already used: check it on your device."
            return 400, "Connect a device", _form(action, user_code, email, problem)
        if decision == "allow":
            return 200, "Device connected", "<p>Access allowed. You can close this tab.</p>"
        return 200, "Access denied", "<p>You denied access. You can close this tab.</p>"


def _form(action: str, user_code: str, email: str, problem: str = "") -> str:
    return (
        (f"<p class='error'>{html.escape(problem)}</p>" if problem else "")
        + "<p>Enter the code your device shows.</p>"
        + f"<form method='post' action='{html.escape(action)}'>"
        + f"<label>Code <input name='user_code' value='{html.escape(user_code)}' required>"
        + "</label> <label>Email address <input type='email' name='email' "
        + f"value='{html.escape(email)}'></label> "
        + "<button name='decision' value='allow'>Allow</button> "
        + "<button name='decision' value='deny' formnovalidate>Deny</button></form>"
    )
