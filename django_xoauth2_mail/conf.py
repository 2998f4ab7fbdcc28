"""The one place that reads ``settings.XOAUTH2_MAIL``.

Every key is read lazily, at each access, so ``override_settings`` works in
tests; defaults live here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

PROVIDER_IDS = ("google", "microsoft", "oauth2", "dev")
SMTP_SECURITY_MODES = ("tls", "starttls", "none")
# A provider's SASL_MECHANISM: "auto" takes XOAUTH2 when the server offers it, else
# OAUTHBEARER (RFC 7628).
SASL_MECHANISM_VALUES = ("auto", "XOAUTH2", "OAUTHBEARER")

DEFAULTS: dict[str, Any] = {
    # provider id -> that provider's settings (CLIENT_ID, CLIENT_SECRET, ...).
    "PROVIDERS": {},
    # Address of the Mailbox used when a message's From matches none.
    "DEFAULT_MAILBOX": None,
    # Fernet keys, newest first. Empty: derived from SECRET_KEY (+ fallbacks).
    "ENCRYPTION_KEYS": [],
    # A cached access token is refreshed when it expires within this many seconds.
    "TOKEN_REFRESH_SKEW": 300,
    # Seconds for each SMTP network operation (connect, TLS, one command, DATA).
    "SMTP_TIMEOUT": 30.0,
    # Seconds for each call to a token endpoint.
    "HTTP_TIMEOUT": 10.0,
    # Tries for a token refresh that fails for a temporary reason (5xx, timeout).
    "TOKEN_REFRESH_ATTEMPTS": 3,
    # Seconds to wait before each retry of a message the SMTP server refused
    # for now (421, 450, 451, 452, 454); one retry per entry.
    "SMTP_RETRY_DELAYS": (1.0, 5.0),
    # Security "none" sends tokens in clear: only to loopback unless this is True.
    "ALLOW_INSECURE_SMTP": False,
    # Seconds an issuer's discovered metadata (oauth2 provider's ISSUER) is reused
    # before it is read again.
    "DISCOVERY_CACHE_SECONDS": 3600.0,
    # Seconds one message waits for its mailbox's shared limits (a session slot
    # under MAX_SESSIONS, room under RATE_LIMIT) before failing for now.
    "LIMIT_WAIT": 120.0,
    # Seconds a session slot stays taken after its process stopped renewing it.
    "SESSION_LEASE": 60.0,
    # Queued sending (TaskEmailBackend): seconds after which a message claimed by
    # a worker that stopped answering is taken back.
    "OUTBOX_LEASE": 300,
    # Sending tries of one queued message before it is marked failed.
    "OUTBOX_MAX_ATTEMPTS": 5,
    # Seconds before each retry of a queued message that failed for a temporary
    # reason (after the worker's own SMTP_RETRY_DELAYS); the last entry repeats.
    "OUTBOX_RETRY_DELAYS": (60.0, 300.0, 900.0, 3600.0),
}


class Settings:
    """Typed, lazy access to ``settings.XOAUTH2_MAIL``."""

    @property
    def _user(self) -> Mapping[str, Any]:
        value = getattr(settings, "XOAUTH2_MAIL", {})
        return value if isinstance(value, Mapping) else {}

    def get(self, key: str) -> Any:
        return self._user.get(key, DEFAULTS[key])

    @property
    def PROVIDERS(self) -> Mapping[str, Mapping[str, Any]]:
        value = self.get("PROVIDERS")
        return value if isinstance(value, Mapping) else {}

    def provider_settings(self, provider_id: str) -> Mapping[str, Any]:
        value = self.PROVIDERS.get(provider_id, {})
        return value if isinstance(value, Mapping) else {}

    @property
    def DEFAULT_MAILBOX(self) -> str | None:
        value = self.get("DEFAULT_MAILBOX")
        return str(value) if value else None

    @property
    def ENCRYPTION_KEYS(self) -> list[str]:
        value = self.get("ENCRYPTION_KEYS")
        if isinstance(value, str):
            return [value]
        return list(value or [])

    @property
    def TOKEN_REFRESH_SKEW(self) -> float:
        return float(self.get("TOKEN_REFRESH_SKEW"))

    @property
    def SMTP_TIMEOUT(self) -> float:
        return float(self.get("SMTP_TIMEOUT"))

    @property
    def HTTP_TIMEOUT(self) -> float:
        return float(self.get("HTTP_TIMEOUT"))

    @property
    def TOKEN_REFRESH_ATTEMPTS(self) -> int:
        return int(self.get("TOKEN_REFRESH_ATTEMPTS"))

    @property
    def SMTP_RETRY_DELAYS(self) -> tuple[float, ...]:
        return tuple(float(delay) for delay in self.get("SMTP_RETRY_DELAYS"))

    @property
    def ALLOW_INSECURE_SMTP(self) -> bool:
        return bool(self.get("ALLOW_INSECURE_SMTP"))

    @property
    def DISCOVERY_CACHE_SECONDS(self) -> float:
        return float(self.get("DISCOVERY_CACHE_SECONDS"))

    @property
    def LIMIT_WAIT(self) -> float:
        return float(self.get("LIMIT_WAIT"))

    @property
    def SESSION_LEASE(self) -> float:
        return float(self.get("SESSION_LEASE"))

    @property
    def OUTBOX_LEASE(self) -> float:
        return float(self.get("OUTBOX_LEASE"))

    @property
    def OUTBOX_MAX_ATTEMPTS(self) -> int:
        return int(self.get("OUTBOX_MAX_ATTEMPTS"))

    @property
    def OUTBOX_RETRY_DELAYS(self) -> tuple[float, ...]:
        return tuple(float(delay) for delay in self.get("OUTBOX_RETRY_DELAYS"))


conf = Settings()


APP_NAME = "django_xoauth2_mail"


def require_installed_app() -> None:
    """Refuse to work when the app is missing from ``INSTALLED_APPS``.

    ``EMAIL_BACKEND`` can name the backend without the app being installed; nothing
    would then check the settings, and the first send would fail in Django's model
    machinery with a RuntimeError that names no fix. (Before the app registry is
    ready, Django itself refuses model imports with AppRegistryNotReady.)
    """
    if apps.apps_ready and not apps.is_installed(APP_NAME):
        raise ImproperlyConfigured(
            f"{APP_NAME} is not in INSTALLED_APPS, so its Mailbox model, where the sending "
            f'accounts are kept, cannot be used. Add "{APP_NAME}" to INSTALLED_APPS in '
            "your settings, then run `python manage.py migrate`."
        )
