"""The token endpoint's client authentication and grants (RFC 6749, 7636, 8628).

:class:`TokenGrants` answers a ``/token`` request that the server has logged and let
through (oauth.py keeps the request log and the injected faults): it authenticates the
client, then runs the named grant against the :class:`~.oauth_store.OAuth2Store`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import unquote_plus

from .device import GRANT_TYPE as DEVICE_CODE_GRANT
from .device import DeviceAuthorizations, DeviceGrantError
from .oauth_http import OAuth2Error, Request
from .oauth_store import OAuth2Store

__all__ = ["GRANT_TYPES", "RESERVED_SCOPES", "TokenGrants", "issuer_url", "pkce_s256", "subject"]

GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials", DEVICE_CODE_GRANT)
# Scopes that OpenID Connect clients (msal among them) add on their own; a refresh that
# names them is not asking for more than was granted.
RESERVED_SCOPES = frozenset({"openid", "email", "profile", "offline_access"})
# RFC 7636 section 4.1: 43 to 128 unreserved characters.
_CODE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pkce_s256(verifier: str) -> str:
    """The S256 code challenge for ``verifier`` (RFC 7636 section 4.2)."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def subject(email: str) -> str:
    # Stable per address, so "sub" survives restarts and token rotation like a real one.
    return hashlib.sha256(email.lower().encode()).hexdigest()[:24]


def issuer_url(base_url: str, tenant: str | None) -> str:
    return f"{base_url}/{tenant}/v2.0" if tenant else base_url


class ServerSettings(Protocol):
    """The ``OAuth2Server`` settings grants read; tests may change them while it runs."""

    rotate_refresh_tokens: bool
    access_token_lifetime: int
    access_token_length: int

    @property
    def base_url(self) -> str: ...


class TokenGrants:
    def __init__(
        self, settings: ServerSettings, store: OAuth2Store, device_codes: DeviceAuthorizations
    ) -> None:
        self.settings, self.store, self.device_codes = settings, store, device_codes

    def authenticate_client(self, request: Request) -> str:
        """The client's id, from HTTP Basic or the form; OAuth2Error 401 if unknown."""
        authorization = request.headers.get("authorization", "")
        if authorization[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(authorization[6:], validate=True).decode()
            except ValueError:  # binascii.Error and UnicodeDecodeError both derive from it
                decoded = ""
            raw_id, _, raw_secret = decoded.partition(":")
            # RFC 6749 section 2.3.1 form-encodes both halves; many clients skip that step.
            candidates = [(unquote_plus(raw_id), unquote_plus(raw_secret)), (raw_id, raw_secret)]
        else:
            params = request.params
            candidates = [(params.get("client_id", ""), params.get("client_secret", ""))]
        with self.store.lock:
            for client_id, secret in candidates:
                client = self.store.clients.get(client_id)
                if client is not None and (
                    client.secret is None
                    or hmac.compare_digest(client.secret.encode(), secret.encode())
                ):
                    return client_id
        raise OAuth2Error("invalid_client", "Unknown client or wrong client secret.", 401)

    def grant(self, grant_type: str, client_id: str, request: Request) -> dict[str, Any]:
        """The token response body for an authenticated client's ``grant_type``."""
        grants: dict[str, Callable[[str, Request], dict[str, Any]]] = {
            "authorization_code": self._authorization_code_grant,
            "refresh_token": self._refresh_token_grant,
            "client_credentials": self._client_credentials_grant,
            DEVICE_CODE_GRANT: self._device_code_grant,
        }
        if not grant_type:
            raise OAuth2Error("invalid_request", "The grant_type parameter is missing.")
        if grant_type not in grants:
            raise OAuth2Error(
                "unsupported_grant_type", f"Grant type {grant_type!r} is not supported."
            )
        return grants[grant_type](client_id, request)

    def issue(
        self,
        client_id: str | None,
        email: str | None,
        scope: str,
        grant_id: str | None,
        with_refresh: bool,
    ) -> dict[str, Any]:
        return self.store.issue(
            client_id, email, scope, grant_id, with_refresh,
            lifetime=self.settings.access_token_lifetime,
            length=self.settings.access_token_length,
        )  # fmt: skip

    def _authorization_code_grant(self, client_id: str, request: Request) -> dict[str, Any]:
        params = request.params
        if not params.get("code"):
            raise OAuth2Error("invalid_request", "The code parameter is missing.")
        with self.store.lock:
            # Popped before any check: a code is spent by its first use, right or wrong.
            code = self.store.codes.pop(params["code"], None)
            self.store.save()
        if code is None or code.expires_at <= time.time() or code.client_id != client_id:
            raise OAuth2Error(
                "invalid_grant", "The authorization code is unknown, expired or used."
            )
        if params.get("redirect_uri", "") != code.redirect_uri:
            raise OAuth2Error(
                "invalid_grant", "redirect_uri differs from the authorization request."
            )
        verifier = params.get("code_verifier", "")
        if not _CODE_VERIFIER.fullmatch(verifier) or not hmac.compare_digest(
            pkce_s256(verifier), code.code_challenge
        ):
            raise OAuth2Error("invalid_grant", "PKCE verification failed: wrong code_verifier.")
        body = self.issue(client_id, code.email, code.scope, secrets.token_hex(8), True)
        if {"openid", "email"} & set(code.scope.split()):
            body["id_token"] = self._id_token(code.email, client_id, request.tenant, code.nonce)
        return body

    def _refresh_token_grant(self, client_id: str, request: Request) -> dict[str, Any]:
        token = request.params.get("refresh_token", "")
        if not token:
            raise OAuth2Error("invalid_request", "The refresh_token parameter is missing.")
        with self.store.lock:
            record = self.store.refresh_tokens.get(token)
            if record is None or record.client_id not in (None, client_id):
                raise OAuth2Error(
                    "invalid_grant", "The refresh token is unknown, revoked or already rotated."
                )
            granted = set(record.scope.split())
            asked = set(request.params.get("scope", "").split()) - RESERVED_SCOPES
            if not asked <= granted:
                raise OAuth2Error(
                    "invalid_scope", f"Not granted: {' '.join(sorted(asked - granted))}"
                )
            rotate = self.settings.rotate_refresh_tokens
            if rotate:
                del self.store.refresh_tokens[token]
            return self.issue(
                record.client_id, record.email, record.scope, record.grant_id, with_refresh=rotate
            )

    def _client_credentials_grant(self, client_id: str, request: Request) -> dict[str, Any]:
        if self.store.clients[client_id].secret is None:
            raise OAuth2Error(
                "unauthorized_client", "A public client cannot use client_credentials."
            )
        return self.issue(client_id, None, request.params.get("scope", ""), None, False)

    def _device_code_grant(self, client_id: str, request: Request) -> dict[str, Any]:
        try:
            grant = self.device_codes.redeem(request.params.get("device_code", ""), client_id)
        except DeviceGrantError as error:
            raise OAuth2Error(error.error, error.description) from None
        body = self.issue(client_id, grant.email, grant.scope, secrets.token_hex(8), True)
        if {"openid", "email"} & set(grant.scope.split()):
            body["id_token"] = self._id_token(grant.email, client_id, request.tenant, None)
        return body

    def _id_token(self, email: str, client_id: str, tenant: str | None, nonce: str | None) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer_url(self.settings.base_url, tenant),
            "sub": subject(email),
            "aud": client_id,
            "email": email,
            "email_verified": True,
            "preferred_username": email,
            "iat": now,
            "exp": now + self.settings.access_token_lifetime,
        }
        if nonce:
            claims["nonce"] = nonce
        # Unsigned ("alg": "none"): well-formed for parsers, worthless as proof, as intended.
        parts = ({"alg": "none", "typ": "JWT"}, claims)
        return ".".join(_b64url(json.dumps(part).encode()) for part in parts) + "."
