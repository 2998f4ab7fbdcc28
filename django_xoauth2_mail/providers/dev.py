"""The bundled development server (``manage.py xoauth2_devserver``) as a provider.

A thin :class:`OAuth2Provider` whose every setting has a default that matches the
server's own defaults, so ``XOAUTH2_MAIL = {"PROVIDERS": {"dev": {}}}`` is a working
configuration. ``BASE_URL`` names the OAuth2 server; the endpoint URLs and the SMTP host
follow from it unless set one by one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

from django_xoauth2_mail.providers.base import SMTPEndpoint
from django_xoauth2_mail.providers.oauth2 import OAuth2Provider

# Not 8025 or 1025: those are the defaults of aiosmtpd's own server, Mailpit and MailHog,
# which developers often have running already.
DEFAULT_OAUTH_PORT = 8765
DEFAULT_SMTP_PORT = 2525
DEFAULT_HOST = "127.0.0.1"
DEFAULT_BASE_URL = f"http://{DEFAULT_HOST}:{DEFAULT_OAUTH_PORT}"
DEFAULT_CLIENT_ID = "dev-client"
DEFAULT_CLIENT_SECRET = "dev-secret"  # published on purpose: it guards nothing real
# The same scope as Google's, so the dev server stands in for Gmail in examples.
DEFAULT_SCOPES = ("openid", "email", "https://mail.google.com/")
# Each endpoint of the development server, relative to BASE_URL.
ENDPOINT_PATHS = {
    "AUTHORIZATION_URL": "/authorize",
    "TOKEN_URL": "/token",
    "USERINFO_URL": "/userinfo",
    "REVOCATION_URL": "/revoke",
    "DEVICE_AUTHORIZATION_URL": "/devicecode",
}


class DevProvider(OAuth2Provider):
    id = "dev"
    name = "Development server"
    # Plain TCP is acceptable only because the server listens on loopback; the SMTP session
    # refuses security "none" towards another host unless ALLOW_INSECURE_SMTP is set.
    default_smtp = SMTPEndpoint(host=DEFAULT_HOST, port=DEFAULT_SMTP_PORT, security="none")
    default_scopes = DEFAULT_SCOPES
    default_rate_limit = None
    required_settings: ClassVar[tuple[str, ...]] = ()
    unreachable_hint: ClassVar[str] = "Is `python manage.py xoauth2_devserver` running?"

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        super().__init__(settings)
        self.settings = with_defaults(self.settings)

    @property
    def base_url(self) -> str:
        return str(self.settings["BASE_URL"])

    @property
    def issuer(self) -> str | None:
        # The development server names itself by its base URL, in every answer.
        return self.base_url

    @property
    def requires_iss(self) -> bool:
        return True

    @property
    def client_id(self) -> str:
        return str(self.settings["CLIENT_ID"])

    @property
    def client_secret(self) -> str:
        return str(self.settings["CLIENT_SECRET"])


def with_defaults(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` completed with the development server's defaults."""
    base_url = str(settings.get("BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    defaults: dict[str, Any] = {
        "BASE_URL": base_url,
        "CLIENT_ID": DEFAULT_CLIENT_ID,
        "CLIENT_SECRET": DEFAULT_CLIENT_SECRET,
        # One process serves both, so the SMTP server is on the OAuth2 server's host.
        "SMTP_HOST": urlsplit(base_url).hostname or DEFAULT_HOST,
    }
    defaults |= {key: base_url + path for key, path in ENDPOINT_PATHS.items()}
    # A key set to None or "" falls back to its default rather than breaking the URL.
    given = {key: value for key, value in settings.items() if value not in (None, "")}
    return defaults | given | {"BASE_URL": base_url}
