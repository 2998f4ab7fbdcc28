"""Any OAuth2 server, configured entirely by URLs in settings."""

from __future__ import annotations

from typing import ClassVar

from django_xoauth2_mail.providers.base import (
    Provider,
    SMTPEndpoint,
    TokenResult,
    expiry_from,
    post_token_request,
)


class OAuth2Provider(Provider):
    id = "oauth2"
    name = "OAuth2 server"
    # No sensible default host: SMTP_HOST is required (see required_settings).
    default_smtp = SMTPEndpoint(host="", port=587, security="starttls")
    required_settings: ClassVar[tuple[str, ...]] = ("CLIENT_ID", "TOKEN_URL", "SMTP_HOST")

    @property
    def token_url(self) -> str:
        return str(self.settings["TOKEN_URL"])

    def refresh_access_token(self, email: str, refresh_token: str | None) -> TokenResult:
        data = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token or "",
            "client_id": str(self.settings["CLIENT_ID"]),
        }
        if self.settings.get("CLIENT_SECRET"):
            data["client_secret"] = str(self.settings["CLIENT_SECRET"])
        if self.scopes:
            data["scope"] = " ".join(self.scopes)
        payload = post_token_request(self.token_url, data)
        return TokenResult(
            access_token=payload["access_token"],
            expires_at=expiry_from(payload.get("expires_in")),
            refresh_token=payload.get("refresh_token") or None,
            scopes=tuple(str(payload.get("scope", "")).split()),
        )
