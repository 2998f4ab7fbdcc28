"""The two SASL mechanisms that carry an OAuth2 bearer token over SMTP AUTH.

XOAUTH2 is Google's and Microsoft's; OAUTHBEARER (RFC 7628) is the IETF standard that
self-hosted servers (Dovecot, Stalwart, Cyrus) offer. Both send one initial response with
the token and, when the server refuses it, get a base64 JSON challenge (334) that the
client must answer before the server's final reply. This module builds those bytes,
chooses the mechanism, and runs the exchange on an aiosmtplib client.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection
from typing import Any, Final, Literal

import aiosmtplib
from aiosmtplib.typing import Default
from django.views.decorators.debug import sensitive_variables

Mechanism = Literal["XOAUTH2", "OAUTHBEARER"]
MECHANISMS: Final[tuple[Mechanism, ...]] = ("XOAUTH2", "OAUTHBEARER")

# RFC 5321 caps a command line at 512 octets; a longer initial response (Microsoft
# tokens run past 2 KB) goes on its own line after the server's 334 (RFC 4954 section 4).
MAX_AUTH_LINE = 512

# The client's answer to the server's error challenge: XOAUTH2 servers (Google,
# Microsoft) wait for an empty line; RFC 7628 section 3.2.3 requires a single %x01.
FAILURE_ANSWERS: Final[dict[Mechanism, bytes]] = {
    "XOAUTH2": b"",
    "OAUTHBEARER": base64.b64encode(b"\x01"),
}

Timeout = float | Literal[Default.token] | None


class SASLRefused(aiosmtplib.SMTPAuthenticationError):
    """The server refused the token, with its decoded JSON challenge when it sent one."""

    def __init__(
        self,
        code: int,
        message: str,
        challenge: dict[str, Any] | None,
        mechanism: Mechanism = "XOAUTH2",
    ) -> None:
        super().__init__(code, message)
        self.challenge = challenge
        self.mechanism = mechanism


class NoCommonMechanism(aiosmtplib.SMTPException):
    """The server offers neither mechanism the setting allows."""


def choose_mechanism(setting: str, offered: Collection[str]) -> Mechanism:
    """The mechanism to use: ``setting``, or for ``auto`` XOAUTH2 if offered, else
    OAUTHBEARER. ``offered`` is the server's AUTH list (any case)."""
    offered_upper = {name.upper() for name in offered}
    wanted = [m for m in MECHANISMS if setting.upper() in ("AUTO", m)]
    for mechanism in wanted:
        if mechanism in offered_upper:
            return mechanism
    offers = " ".join(sorted(offered_upper)) or "no AUTH mechanism at all"
    asked = " or ".join(wanted) if wanted else repr(setting)
    raise NoCommonMechanism(
        f"the server offers {offers}, not {asked}; set the provider's SASL_MECHANISM to "
        "one the server offers (XOAUTH2 or OAUTHBEARER), or enable one of them on the "
        "server (Dovecot: auth_mechanisms = oauthbearer xoauth2)"
    )


@sensitive_variables()
def xoauth2_response(address: str, token: str) -> bytes:
    """``user=ADDRESS^Aauth=Bearer TOKEN^A^A``, unencoded."""
    return f"user={address}\x01auth=Bearer {token}\x01\x01".encode()


def _saslname(value: str) -> str:
    # RFC 5801 section 4: "=" and "," are escaped inside the GS2 authzid.
    return value.replace("=", "=3D").replace(",", "=2C")


@sensitive_variables()
def oauthbearer_response(address: str, token: str, host: str, port: int) -> bytes:
    """RFC 7628 section 3.1: the GS2 header naming the mailbox, then host, port and
    the bearer token as key-value pairs, each ended by %x01, and a final %x01."""
    gs2_header = f"n,a={_saslname(address)},"
    pairs = f"\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    return (gs2_header + pairs).encode()


@sensitive_variables()
def initial_response(mechanism: Mechanism, address: str, token: str, host: str, port: int) -> bytes:
    """The base64 initial response that carries the token."""
    if mechanism == "OAUTHBEARER":
        raw = oauthbearer_response(address, token, host, port)
    else:
        raw = xoauth2_response(address, token)
    return base64.b64encode(raw)


def decode_challenge(message: str) -> dict[str, Any] | None:
    """The server's 334 error challenge (base64 JSON), or None when it is not one."""
    try:
        decoded = json.loads(base64.b64decode(message.strip(), validate=True))
    except (ValueError, binascii.Error):
        return None
    return decoded if isinstance(decoded, dict) else None


def describe_challenge(challenge: dict[str, Any] | None) -> str:
    """`` (token status 401, expected scope ...)`` for an error message; "" for none."""
    if not challenge:
        return ""
    details = [f"token status {challenge.get('status')}"]
    if challenge.get("scope"):
        details.append(f"expected scope {challenge['scope']}")
    if challenge.get("openid-configuration"):
        details.append(f"the server trusts the issuer at {challenge['openid-configuration']}")
    return f" ({', '.join(details)})"


@sensitive_variables()
async def authenticate(
    client: aiosmtplib.SMTP,
    mechanism: Mechanism,
    address: str,
    token: str,
    *,
    timeout: Timeout = Default.token,
) -> aiosmtplib.SMTPResponse:
    """Run AUTH with ``mechanism`` on a connected client; raise SASLRefused unless 235."""
    hostname, port = client.hostname or "", client.port or 0
    response_bytes = initial_response(mechanism, address, token, hostname, port)
    name = mechanism.encode()
    if len(b"AUTH " + name + b" " + response_bytes + b"\r\n") <= MAX_AUTH_LINE:
        response = await client.execute_command(b"AUTH", name, response_bytes, timeout=timeout)
    else:
        response = await client.execute_command(b"AUTH", name, timeout=timeout)
        if response.code != 334:
            raise SASLRefused(response.code, response.message, None, mechanism)
        response = await client.execute_command(response_bytes, timeout=timeout)
    challenge = None
    if response.code == 334:
        # The server explains the refusal and waits for the client's answer before
        # its final reply (535 for a bad token).
        challenge = decode_challenge(response.message)
        answer = FAILURE_ANSWERS[mechanism]
        response = await client.execute_command(answer, timeout=timeout)
    if response.code != 235:
        raise SASLRefused(response.code, response.message, challenge, mechanism)
    return response
