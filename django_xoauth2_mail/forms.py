"""Forms of the admin's consent flow."""

from __future__ import annotations

from typing import Any

from django import forms
from django.utils.translation import gettext_lazy as _

from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.providers import PROVIDER_CLASSES, get_provider_class
from django_xoauth2_mail.providers.base import Provider


def consent_provider_choices() -> list[tuple[str, str]]:
    """(id, label) of every configured provider that has a consent step.

    A provider listed in PROVIDER_CLASSES may fail to import (an optional
    dependency missing, or a module not written yet): it is left out here
    rather than breaking the admin; the system checks report it.
    """
    choices = []
    for provider_id in conf.PROVIDERS:
        if provider_id not in PROVIDER_CLASSES:
            continue
        try:
            provider_class = get_provider_class(provider_id)
        except ImportError:
            continue
        # Providers without a browser consent (e.g. service accounts only) keep
        # the base class's authorization_url, which raises NotImplementedError.
        if provider_class.authorization_url is Provider.authorization_url:
            continue
        choices.append((provider_id, f"{provider_class.name} ({provider_id})"))
    return choices


class ConnectMailboxForm(forms.Form):
    provider = forms.ChoiceField(
        label=_("Provider"),
        help_text=_("Only the providers configured in XOAUTH2_MAIL['PROVIDERS'] are listed."),
    )
    email = forms.EmailField(
        label=_("Address"),
        required=False,
        help_text=_(
            "Optional. The account to connect: the provider's sign-in page is pre-filled with "
            "it, and the consent is refused if the provider says another account gave it. "
            "A provider that does not say which account consented cannot replace the grant "
            "of an existing mailbox unless you tick the box below."
        ),
    )
    accept_unidentified = forms.BooleanField(
        label=_(
            "Replace an existing mailbox's grant even if the provider does not say who consented"
        ),
        required=False,
        help_text=_(
            "Only for providers that return no address (an oauth2 server without "
            "USERINFO_URL or an email claim): the grant is then saved for the address typed "
            "above without any check, so sign in at the provider as exactly that account."
        ),
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.provider_choices = consent_provider_choices()
        self.fields["provider"].choices = self.provider_choices  # type: ignore[attr-defined]
