"""Any OAuth2 server, configured entirely by URLs in settings."""

from __future__ import annotations

from typing import Any, ClassVar

import requests
from django.views.decorators.debug import sensitive_variables

from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.providers import device_grant
from django_xoauth2_mail.providers.base import (
    ConsentResult,
    DeviceFlow,
    Provider,
    SMTPEndpoint,
    TokenResult,
    authorization_request_url,
    expiry_from,
    id_token_claims,
    post_token_request,
)


class OAuth2Provider(Provider):
    id = "oauth2"
    name = "OAuth2 server"
    # No sensible default host: SMTP_HOST is required (see required_settings).
    default_smtp = SMTPEndpoint(host="", port=587, security="starttls")
    required_settings: ClassVar[tuple[str, ...]] = ("CLIENT_ID", "TOKEN_URL", "SMTP_HOST")

    def _setting(self, key: str) -> str:
        return str(self.settings.get(key) or "")

    @sensitive_variables()
    def _client_auth(self) -> dict[str, str]:
        data = {"client_id": self._setting("CLIENT_ID")}
        if self.settings.get("CLIENT_SECRET"):
            data["client_secret"] = self._setting("CLIENT_SECRET")
        return data

    @sensitive_variables()
    def refresh_access_token(self, email: str, refresh_token: str | None) -> TokenResult:
        data = {"grant_type": "refresh_token", "refresh_token": refresh_token or ""}
        if self.scopes:
            data["scope"] = " ".join(self.scopes)
        payload = post_token_request(self._setting("TOKEN_URL"), data | self._client_auth())
        return TokenResult(
            access_token=payload["access_token"],
            expires_at=expiry_from(payload.get("expires_in")),
            refresh_token=payload.get("refresh_token") or None,
            scopes=tuple(str(payload.get("scope", "")).split()),
        )

    def authorization_url(
        self, *, redirect_uri: str, state: str, code_challenge: str, login_hint: str | None = None
    ) -> str:
        return authorization_request_url(
            self._setting("AUTHORIZATION_URL"),
            client_id=self._setting("CLIENT_ID"),
            redirect_uri=redirect_uri,
            scopes=self.scopes,
            state=state,
            code_challenge=code_challenge,
            login_hint=login_hint,
        )

    @sensitive_variables()
    def exchange_code(self, *, code: str, redirect_uri: str, code_verifier: str) -> ConsentResult:
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }
        payload = post_token_request(self._setting("TOKEN_URL"), data | self._client_auth())
        return ConsentResult(
            email=self._email_of(payload),
            access_token=payload["access_token"],
            expires_at=expiry_from(payload.get("expires_in")),
            refresh_token=payload.get("refresh_token") or None,
            scopes=tuple(str(payload.get("scope", "")).split()),
        )

    @sensitive_variables()
    def _email_of(self, payload: dict[str, Any]) -> str | None:
        """The account's address: the ID token's claim, else the userinfo endpoint."""
        claims = id_token_claims(payload.get("id_token"))
        if isinstance(claims.get("email"), str):
            return str(claims["email"])
        url = self._setting("USERINFO_URL")
        if not url:
            return None
        try:
            response = requests.get(
                url,
                headers={"Authorization": f"Bearer {payload['access_token']}"},
                timeout=conf.HTTP_TIMEOUT,
            )
            email = response.json().get("email") if response.ok else None
        except (requests.RequestException, ValueError):
            return None
        return email if isinstance(email, str) else None

    @property
    def issuer(self) -> str | None:
        return self._setting("ISSUER") or None

        # RFC 8628, when the server names its device authorization endpoint.

    supports_device_flow = True

    def start_device_flow(self) -> DeviceFlow:
        url = self._setting("DEVICE_AUTHORIZATION_URL")
        return device_grant.start(url, self.scopes, self._client_auth())

    @sensitive_variables()
    def finish_device_flow(self, flow: DeviceFlow, *, timeout: float) -> ConsentResult:
        token_url, auth = self._setting("TOKEN_URL"), self._client_auth()
        payload = device_grant.poll(token_url, flow, auth, timeout=timeout)
        return device_grant.consent_result(payload, self._email_of(payload))

    @sensitive_variables()
    def revoke_token(self, token: str) -> bool:
        url = self._setting("REVOCATION_URL")
        if not url:
            return False
        data = {"token": token, "token_type_hint": "refresh_token"} | self._client_auth()
        try:
            response = requests.post(url, data=data, timeout=conf.HTTP_TIMEOUT)
        except requests.RequestException:
            return False
        return response.ok
