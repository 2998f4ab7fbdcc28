"""Provider adapters, by provider id. Explicit: no discovery by import."""

from __future__ import annotations

from django.utils.module_loading import import_string

from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.exceptions import ConfigurationError
from django_xoauth2_mail.providers.base import Provider

# Imported on first use, so a site using Google never imports msal.
PROVIDER_CLASSES: dict[str, str] = {
    "google": "django_xoauth2_mail.providers.google.GoogleProvider",
    "microsoft": "django_xoauth2_mail.providers.microsoft.MicrosoftProvider",
    "oauth2": "django_xoauth2_mail.providers.oauth2.OAuth2Provider",
    "dev": "django_xoauth2_mail.providers.dev.DevProvider",
}

# The settings keys each provider reads: the one list that the system checks (an unknown
# key is a warning) and the settings page of the documentation (a test compares them)
# follow. Kept here, not on the classes, so `check` imports neither msal nor google-auth.
_CLIENT = ("CLIENT_ID", "CLIENT_SECRET", "SCOPES")
_SMTP = (
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_SECURITY",
    "SMTP_CA_FILE",
    "SASL_MECHANISM",
    "RATE_LIMIT",
    "MAX_SESSIONS",
)
_OAUTH2_URLS = (
    "AUTHORIZATION_URL",
    "TOKEN_URL",
    "USERINFO_URL",
    "REVOCATION_URL",
    "DEVICE_AUTHORIZATION_URL",
)
PROVIDER_SETTINGS: dict[str, frozenset[str]] = {
    "google": frozenset(
        (*_CLIENT, *_SMTP, "AUTHORIZATION_URL", "TOKEN_URL", "REVOCATION_URL")
        + ("SERVICE_ACCOUNT_FILE", "SERVICE_ACCOUNT_INFO")
    ),
    "microsoft": frozenset(
        (*_CLIENT, *_SMTP, "TENANT", "AUTHORITY_HOST", "APP_ONLY", "HTTP_CA_FILE")
    ),
    "oauth2": frozenset((*_CLIENT, *_SMTP, *_OAUTH2_URLS, "ISSUER")),
    "dev": frozenset((*_CLIENT, *_SMTP, *_OAUTH2_URLS, "BASE_URL")),
}

# The smallest working block per provider, for messages that say what to add.
SETTINGS_EXAMPLES: dict[str, str] = {
    "google": '"google": {"CLIENT_ID": "...", "CLIENT_SECRET": "..."}',
    "microsoft": '"microsoft": {"CLIENT_ID": "...", "CLIENT_SECRET": "...", "TENANT": "common"}',
    "oauth2": '"oauth2": {"CLIENT_ID": "...", "CLIENT_SECRET": "...", '
    '"AUTHORIZATION_URL": "https://...", "TOKEN_URL": "https://...", "SMTP_HOST": "..."}',
    "dev": '"dev": {}',
}


def get_provider_class(provider_id: str) -> type[Provider]:
    try:
        path = PROVIDER_CLASSES[provider_id]
    except KeyError:
        known = ", ".join(sorted(PROVIDER_CLASSES))
        raise ConfigurationError(
            f"Unknown mail provider {provider_id!r}; the known ones are {known}."
        ) from None
    provider_class: type[Provider] = import_string(path)
    return provider_class


def get_provider(provider_id: str, *, mailbox: str | None = None) -> Provider:
    """The adapter for ``provider_id``, configured from ``XOAUTH2_MAIL["PROVIDERS"]``.

    A provider missing from the settings is an error, never a silent fall-back on the
    adapter's defaults (which would send requests to hosts the site never named).
    ``mailbox``, when given, is named in that error.
    """
    provider_class = get_provider_class(provider_id)
    if provider_id not in conf.PROVIDERS:
        raise ProviderNotConfigured(provider_id, mailbox=mailbox)
    return provider_class()


def configured_provider_ids() -> list[str]:
    """The known provider ids present in ``XOAUTH2_MAIL["PROVIDERS"]``, in settings order."""
    return [provider_id for provider_id in conf.PROVIDERS if provider_id in PROVIDER_CLASSES]


class ProviderNotConfigured(ConfigurationError):
    """A provider id that ``XOAUTH2_MAIL["PROVIDERS"]`` does not configure."""

    def __init__(self, provider_id: str, *, mailbox: str | None = None) -> None:
        configured = ", ".join(configured_provider_ids()) or "none"
        who = (
            f"The mailbox {mailbox} uses the provider {provider_id!r}, which is"
            if mailbox
            else f"The provider {provider_id!r} is"
        )
        fix = f'XOAUTH2_MAIL = {{"PROVIDERS": {{{SETTINGS_EXAMPLES[provider_id]}}}}}'
        text = (
            f"{who} not in XOAUTH2_MAIL['PROVIDERS'] (configured: {configured}). Add it to "
            f"your settings, e.g. {fix}"
        )
        if provider_id == "dev":
            text += ", and run `python manage.py xoauth2_devserver`"
        if mailbox:
            text += f", or connect {mailbox} again with a configured provider"
        super().__init__(text + ".", mailbox=mailbox)
        self.provider_id = provider_id
