"""System checks of the way mail reaches a mailbox, beyond ``XOAUTH2_MAIL`` itself
(checks.py): the options of ``MAILERS`` aliases that use this package, Django's own
sending addresses (``SERVER_EMAIL``, ``DEFAULT_FROM_EMAIL``), and mailboxes whose
provider is not configured. ``list_mailboxes`` and the admin show the same findings."""

from __future__ import annotations

import email.utils
import inspect
from collections.abc import Mapping
from typing import Any

import django
from django.conf import global_settings, settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.db import DatabaseError, router
from django.utils.module_loading import import_string

from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.models import Mailbox, MailboxStatus, normalize_address


def mailboxes_without_provider(using: str | None = None) -> dict[str, list[str]]:
    """Provider id -> addresses of the mailboxes that use it while it is missing from
    ``XOAUTH2_MAIL["PROVIDERS"]`` (such a mailbox cannot send, nor refresh its token)."""
    rows = Mailbox.objects.using(using).exclude(provider__in=list(conf.PROVIDERS))
    missing: dict[str, list[str]] = {}
    for provider_id, address in rows.order_by("email").values_list("provider", "email"):
        missing.setdefault(provider_id, []).append(address)
    return missing


@register(Tags.database)
def check_mailbox_providers(databases: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Mailboxes whose provider is not configured. A database check: it runs in
    ``migrate`` and ``check --database default``, not in a plain ``check``."""
    using = router.db_for_read(Mailbox)
    if not databases or using not in databases:
        return []
    try:
        missing = mailboxes_without_provider(using)
    except DatabaseError:
        return []  # not migrated yet: there are no mailboxes to check
    return [
        Warning(
            f"{len(emails)} mailbox(es) use the provider {provider_id!r}, which is not in "
            f"XOAUTH2_MAIL['PROVIDERS']: {_some(emails)} cannot send.",
            hint=f"Add {provider_id!r} to XOAUTH2_MAIL['PROVIDERS'] (was it misspelt?), or "
            "connect these mailboxes again with a configured provider.",
            id="xoauth2_mail.W023",
        )
        for provider_id, emails in sorted(missing.items())
    ]


def _some(items: list[str], shown: int = 5) -> str:
    return ", ".join(items[:shown]) + (" ..." if len(items) > shown else "")


# Which backend sends, and from where. ------------------------------------------------------

OUR_PACKAGE = "django_xoauth2_mail."
# (setting, what Django sends from it) for the site's own addresses.
SITE_ADDRESSES = (
    ("SERVER_EMAIL", "mail_admins(), mail_managers() and error reports"),
    ("DEFAULT_FROM_EMAIL", "send_mail() without a from_email, and the password-reset email"),
)


def _our_mailers() -> dict[str, Mapping[str, Any]]:
    """The MAILERS aliases (Django 6.1) whose BACKEND is one of this package's."""
    mailers = getattr(settings, "MAILERS", None)
    if not isinstance(mailers, Mapping):
        return {}
    return {
        str(alias): config
        for alias, config in mailers.items()
        if isinstance(config, Mapping) and str(config.get("BACKEND", "")).startswith(OUR_PACKAGE)
    }


def _our_backend_sends_by_default() -> bool:
    """True when Django's own mail (mail_admins, password reset) goes through this package:
    the ``default`` mailer's backend where Django reads MAILERS (6.1 and later, when set),
    else ``EMAIL_BACKEND`` (which Django 6.1 deprecates: not read when MAILERS is set)."""
    if django.VERSION >= (6, 1) and isinstance(getattr(settings, "MAILERS", None), Mapping):
        return "default" in _our_mailers()
    return str(getattr(settings, "EMAIL_BACKEND", "")).startswith(OUR_PACKAGE)


def fallback_mailbox() -> str | None:
    """The mailbox Django's own mail (mail_admins, password reset) falls back on: the
    default mailer's ``mailbox`` option, else ``XOAUTH2_MAIL["DEFAULT_MAILBOX"]``."""
    mailers = _our_mailers() if django.VERSION >= (6, 1) else {}  # read by Django 6.1+
    options = mailers.get("default", {}).get("OPTIONS") or {}
    mailbox = options.get("mailbox") if isinstance(options, Mapping) else None
    return str(mailbox) if mailbox else conf.DEFAULT_MAILBOX


@register(Tags.compatibility)
def check_site_addresses(**kwargs: Any) -> list[CheckMessage]:
    """SERVER_EMAIL / DEFAULT_FROM_EMAIL left at Django's defaults, which no mailbox has."""
    if not _our_backend_sends_by_default() or fallback_mailbox():
        return []
    messages: list[CheckMessage] = []
    for number, (name, used_by) in enumerate(SITE_ADDRESSES, start=21):
        address = getattr(settings, name, getattr(global_settings, name))
        if address != getattr(global_settings, name):
            continue
        messages.append(
            Warning(
                f"{name} is Django's default, {address!r}: {used_by} are sent from it, and "
                "no mailbox can send as that address.",
                hint=f"Set {name} to the address of the mailbox you connect (e.g. "
                f'{name} = "noreply@example.com"), or set XOAUTH2_MAIL["DEFAULT_MAILBOX"].',
                id=f"xoauth2_mail.W0{number}",
            )
        )
    return messages


def unsendable_site_addresses() -> list[tuple[str, str, str]]:
    """(setting, address, who sends from it) for SERVER_EMAIL and DEFAULT_FROM_EMAIL when
    no connected mailbox would send their mail: the backend's own choice (the address,
    else the fallback mailbox) finds none, or finds one that cannot send now."""
    if not _our_backend_sends_by_default():
        return []
    fallback = fallback_mailbox()
    unsendable = []
    for name, used_by in SITE_ADDRESSES:
        address = str(getattr(settings, name, "") or "")
        candidates = [normalize_address(email.utils.parseaddr(address)[1])]
        candidates += [normalize_address(fallback)] if fallback else []
        found = {m.email: m for m in Mailbox.objects.filter(email__in=candidates)}
        chosen = next((found[c] for c in candidates if c in found), None)
        if not _can_send(chosen):
            unsendable.append((name, address, used_by))
    return unsendable


def _can_send(mailbox: Mailbox | None) -> bool:
    return (
        mailbox is not None
        and mailbox.status == MailboxStatus.CONNECTED
        and mailbox.provider in conf.PROVIDERS
    )


@register(Tags.compatibility)
def check_mailers(**kwargs: Any) -> list[CheckMessage]:
    """The OPTIONS of every MAILERS alias whose BACKEND is this package's: Django 6.1
    would refuse an unknown one (InvalidMailer) only at the first send."""
    messages: list[CheckMessage] = []
    for alias, config in _our_mailers().items():
        path = str(config["BACKEND"])
        try:
            backend_class = import_string(path)
        except ImportError:
            messages.append(
                Error(
                    f"MAILERS[{alias!r}]['BACKEND'] is {path!r}, which does not exist.",
                    hint="Use 'django_xoauth2_mail.backends.EmailBackend'.",
                    id="xoauth2_mail.E021",
                )
            )
            continue
        options = config.get("OPTIONS") or {}
        known = backend_options(backend_class)
        for option in sorted(set(options) - known) if isinstance(options, Mapping) else []:
            messages.append(
                Error(
                    f"MAILERS[{alias!r}]['OPTIONS'] has {option!r}, which "
                    f"{backend_class.__name__} does not take: the first send through "
                    f"{alias!r} would fail.",
                    hint=f"Its options: {', '.join(sorted(known))}.",
                    id="xoauth2_mail.E020",
                )
            )
    return messages


def backend_options(backend_class: type) -> set[str]:
    """The options a backend class takes: its constructor's named parameters, less
    Django's own ``username``/``password`` (a mailer names its mailbox with ``mailbox``)."""
    parameters = inspect.signature(backend_class).parameters.values()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in parameters if p.kind in named} - {"username", "password"}


def sending_problems() -> list[str]:
    """Mailboxes whose provider is missing, and site addresses no mailbox sends from, as
    sentences with their fix (for ``list_mailboxes`` and the admin's list of mailboxes)."""
    problems = [
        f"The provider {provider_id!r} of {', '.join(emails)} is not in "
        "XOAUTH2_MAIL['PROVIDERS']: they cannot send until it is configured."
        for provider_id, emails in sorted(mailboxes_without_provider().items())
    ]
    problems += [
        f"No mailbox can send from {name} ({address}), so {used_by} will fail: set {name} "
        f"to a connected mailbox's address, or connect {address}."
        for name, address, used_by in unsendable_site_addresses()
    ]
    return problems
