"""Provider adapters, by provider id. Explicit: no discovery by import."""

from __future__ import annotations

from django.utils.module_loading import import_string

from django_xoauth2_mail.exceptions import ConfigurationError
from django_xoauth2_mail.providers.base import Provider

# Imported on first use, so a site using Google never imports msal.
PROVIDER_CLASSES: dict[str, str] = {
    "google": "django_xoauth2_mail.providers.google.GoogleProvider",
    "microsoft": "django_xoauth2_mail.providers.microsoft.MicrosoftProvider",
    "oauth2": "django_xoauth2_mail.providers.oauth2.OAuth2Provider",
    "dev": "django_xoauth2_mail.providers.dev.DevProvider",
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


def get_provider(provider_id: str) -> Provider:
    """The adapter for ``provider_id``, configured from ``XOAUTH2_MAIL["PROVIDERS"]``."""
    return get_provider_class(provider_id)()
