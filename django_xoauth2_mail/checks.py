"""System checks for ``XOAUTH2_MAIL``: every mistake a site can make in its
settings is reported at start-up (``manage.py check``) with an id, never as
a traceback while sending mail."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from cryptography.fernet import Fernet
from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from django_xoauth2_mail.conf import (
    DEFAULTS,
    PROVIDER_IDS,
    SASL_MECHANISM_VALUES,
    SMTP_SECURITY_MODES,
)
from django_xoauth2_mail.providers import PROVIDER_SETTINGS
from django_xoauth2_mail.providers.base import is_loopback, normalized_smtp_security

# Every key some provider reads; providers/__init__.py says which provider reads which.
PROVIDER_KEYS = frozenset().union(*PROVIDER_SETTINGS.values())
NUMBERS = {
    "TOKEN_REFRESH_SKEW": (int, float),
    "SMTP_TIMEOUT": (int, float),
    "HTTP_TIMEOUT": (int, float),
    "TOKEN_REFRESH_ATTEMPTS": (int,),
}


def _is_number(value: Any, types: Any = int | float) -> bool:
    """An int or float (or ``types``), but not a bool, which Python counts as an int."""
    return isinstance(value, types) and not isinstance(value, bool)


def _is_seconds_list(value: Any) -> bool:
    """A list or tuple of non-negative numbers of seconds (retry delays)."""
    return isinstance(value, list | tuple) and all(_is_number(d) and d >= 0 for d in value)


def _error(id_number: int, msg: str, hint: str) -> Error:
    return Error(msg, hint=hint, id=f"xoauth2_mail.E{id_number:03d}")


@register(Tags.compatibility)
def check_settings(**kwargs: Any) -> list[CheckMessage]:
    value = getattr(settings, "XOAUTH2_MAIL", {})
    if not isinstance(value, Mapping):
        return [
            _error(
                1,
                f"XOAUTH2_MAIL must be a dict, not {type(value).__name__}.",
                "Set XOAUTH2_MAIL = {'PROVIDERS': {...}} in your settings.",
            )
        ]
    messages: list[CheckMessage] = []
    for key in sorted(set(value) - set(DEFAULTS)):
        messages.append(
            Warning(
                f"XOAUTH2_MAIL has an unknown key {key!r}; it is ignored.",
                hint=f"Known keys: {', '.join(sorted(DEFAULTS))}.",
                id="xoauth2_mail.W001",
            )
        )
    for key, types in NUMBERS.items():
        number = value.get(key, DEFAULTS[key])
        if not _is_number(number, types) or number <= 0:
            messages.append(
                _error(
                    2,
                    f"XOAUTH2_MAIL[{key!r}] must be a positive number, not {number!r}.",
                    f"Remove it to use the default ({DEFAULTS[key]!r}).",
                )
            )
    default_mailbox = value.get("DEFAULT_MAILBOX")
    if default_mailbox is not None and (
        not isinstance(default_mailbox, str) or "@" not in default_mailbox
    ):
        messages.append(
            _error(
                3,
                "XOAUTH2_MAIL['DEFAULT_MAILBOX'] must be an email address, "
                f"not {default_mailbox!r}.",
                "Use the address of a connected Mailbox, or remove the key.",
            )
        )
    delays = value.get("SMTP_RETRY_DELAYS", DEFAULTS["SMTP_RETRY_DELAYS"])
    if not _is_seconds_list(delays):
        messages.append(
            _error(
                16,
                f"XOAUTH2_MAIL['SMTP_RETRY_DELAYS'] must be a list of seconds, not {delays!r}.",
                "e.g. [1, 5]: retry a temporarily refused message after 1 s, then after 5 s.",
            )
        )
    if not isinstance(value.get("ALLOW_INSECURE_SMTP", False), bool):
        messages.append(_error(4, "XOAUTH2_MAIL['ALLOW_INSECURE_SMTP'] must be True or False.", ""))
    providers = value.get("PROVIDERS", {})
    if not isinstance(providers, Mapping):
        return [
            *messages,
            _error(
                5,
                "XOAUTH2_MAIL['PROVIDERS'] must be a dict of provider id -> settings.",
                f"Provider ids: {', '.join(PROVIDER_IDS)}.",
            ),
        ]
    for provider_id, provider_settings in providers.items():
        messages += _check_provider(provider_id, provider_settings)
    return messages


def _check_encryption(keys: Any) -> list[CheckMessage]:
    keys = [keys] if isinstance(keys, str | bytes) else keys
    if not isinstance(keys, list | tuple):
        return [
            Error(
                "XOAUTH2_MAIL['ENCRYPTION_KEYS'] must be a list of Fernet keys, newest first.",
                id="xoauth2_mail.E006",
            )
        ]
    messages: list[CheckMessage] = []
    for position, key in enumerate(keys):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            messages.append(
                Error(
                    f"XOAUTH2_MAIL['ENCRYPTION_KEYS'][{position}] is not a Fernet key "
                    "(32 url-safe base64-encoded bytes).",
                    hint="Generate one with `python -c 'from cryptography.fernet import Fernet; "
                    "print(Fernet.generate_key().decode())'`.",
                    id="xoauth2_mail.E006",
                )
            )
    return messages


def _check_provider(provider_id: Any, provider_settings: Any) -> list[CheckMessage]:
    from django_xoauth2_mail.providers import PROVIDER_CLASSES, get_provider_class

    label = f"XOAUTH2_MAIL['PROVIDERS'][{provider_id!r}]"
    if provider_id not in PROVIDER_IDS or provider_id not in PROVIDER_CLASSES:
        return [
            _error(
                8,
                f"{label}: unknown provider id {provider_id!r}.",
                f"Use one of {', '.join(sorted(PROVIDER_CLASSES))}.",
            )
        ]
    if not isinstance(provider_settings, Mapping):
        return [_error(9, f"{label} must be a dict of settings.", "")]
    messages: list[CheckMessage] = []
    known = PROVIDER_SETTINGS[provider_id]
    for key in sorted(set(provider_settings) - PROVIDER_KEYS):
        messages.append(
            Warning(
                f"{label} has an unknown key {key!r}; it is ignored.",
                hint=f"Known keys: {', '.join(sorted(known))}.",
                id="xoauth2_mail.W002",
            )
        )
    messages += _keys_of_other_providers(provider_id, provider_settings)
    provider_class = get_provider_class(provider_id)
    for key in provider_class.required_settings:
        if not provider_settings.get(key):
            messages.append(
                _error(
                    10,
                    f"{label} has no {key}.",
                    f"Set {key}; see the {provider_class.name} page of the documentation.",
                )
            )
    for problem, hint in provider_class.settings_problems(provider_settings):
        messages.append(_error(17, f"{label}: {problem}", hint))
    messages += _check_smtp(label, provider_settings)
    scopes = provider_settings.get("SCOPES")
    if scopes is not None and (
        isinstance(scopes, str) or not all(isinstance(s, str) for s in scopes)
    ):
        messages.append(
            _error(14, f"{label}['SCOPES'] must be a list of strings.", "e.g. ['openid', 'email']")
        )
    return messages


def _check_smtp(label: str, values: Mapping[str, Any]) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    security = values.get("SMTP_SECURITY")
    if security is not None and normalized_smtp_security(security) is None:
        messages.append(
            _error(
                11,
                f"{label}['SMTP_SECURITY'] is {security!r}; mail from this provider is "
                "refused until it is fixed.",
                f"Use one of {', '.join(SMTP_SECURITY_MODES)}.",
            )
        )
    port = values.get("SMTP_PORT")
    if port is not None and (not _is_number(port, int) or not 0 < port < 65536):
        messages.append(
            _error(12, f"{label}['SMTP_PORT'] must be a port number, not {port!r}.", "")
        )
    ca_file = values.get("SMTP_CA_FILE")
    if ca_file is not None and not (isinstance(ca_file, str) and os.path.isfile(ca_file)):
        messages.append(
            _error(13, f"{label}['SMTP_CA_FILE'] {ca_file!r} is not a readable file.", "")
        )
    return messages


@register(Tags.security, deploy=False)
def check_security(**kwargs: Any) -> list[CheckMessage]:
    """Key material, and tokens that would cross the network in clear."""
    value = getattr(settings, "XOAUTH2_MAIL", {})
    if not isinstance(value, Mapping):
        return []  # reported as E001
    messages = _check_encryption(value.get("ENCRYPTION_KEYS", []))
    providers = value.get("PROVIDERS", {})
    if not isinstance(providers, Mapping) or value.get("ALLOW_INSECURE_SMTP"):
        return messages
    for provider_id, values in providers.items():
        if (
            not isinstance(values, Mapping)
            or normalized_smtp_security(values.get("SMTP_SECURITY")) != "none"
        ):
            continue
        host = str(values.get("SMTP_HOST", ""))
        if host and not is_loopback(host):
            messages.append(
                Error(
                    f"XOAUTH2_MAIL['PROVIDERS'][{provider_id!r}] would send access tokens in "
                    f"clear (SMTP_SECURITY 'none') to {host}.",
                    hint="Use 'tls' or 'starttls'; 'none' is meant for servers on this machine. "
                    "XOAUTH2_MAIL['ALLOW_INSECURE_SMTP'] = True overrides this check.",
                    id="xoauth2_mail.E015",
                )
            )
    return messages


# DEBUG and the development provider (xoauth2_mail.W010, W011). ---------------------


def _configured_providers() -> list[str]:
    value = getattr(settings, "XOAUTH2_MAIL", {})
    providers = value.get("PROVIDERS", {}) if isinstance(value, Mapping) else {}
    return [str(p) for p in providers] if isinstance(providers, Mapping) else []


@register(Tags.security)
def check_debug_with_real_providers(**kwargs: Any) -> list[CheckMessage]:
    """DEBUG=True turns Django's cleansing of error reports off: tokens become visible."""
    real = [p for p in _configured_providers() if p != "dev"]
    if not settings.DEBUG or not real:
        return []
    return [
        Warning(
            f"DEBUG is True and XOAUTH2_MAIL configures {', '.join(map(repr, real))}: under "
            "DEBUG, Django's technical 500 page shows every local variable (its "
            "sensitive_variables cleansing is off), so an error during a token refresh, a "
            "send or a consent shows the mailbox's access and refresh tokens, the PKCE "
            "verifier and the client secret to whoever sees the page.",
            hint="Use the 'dev' provider (manage.py xoauth2_devserver) while DEBUG is True, "
            "or keep such a site to yourself; connect real accounts with DEBUG = False.",
            id="xoauth2_mail.W010",
        )
    ]


def _dev_provider_warning() -> list[CheckMessage]:
    if "dev" not in _configured_providers():
        return []
    return [
        Warning(
            "XOAUTH2_MAIL configures the 'dev' provider outside development: its client "
            "secret is published, and it sends tokens and mail in clear to whatever listens "
            "on its ports. Any local user who binds them while the development server is not "
            "running receives the refresh token, the client secret and every message "
            "(password-reset links included).",
            hint="Remove 'dev' from XOAUTH2_MAIL['PROVIDERS'] in production settings and "
            "connect a google, microsoft or oauth2 mailbox instead.",
            id="xoauth2_mail.W011",
        )
    ]


@register(Tags.security)
def check_dev_provider_without_debug(**kwargs: Any) -> list[CheckMessage]:
    """A site with DEBUG=False is treated as a deployment."""
    return [] if settings.DEBUG else _dev_provider_warning()


@register(Tags.security, deploy=True)
def check_dev_provider_in_deployment(**kwargs: Any) -> list[CheckMessage]:
    """``check --deploy`` says the settings are for production, whatever DEBUG is; with
    DEBUG=False the check above already reported it (one message, not two)."""
    return _dev_provider_warning() if settings.DEBUG else []


# OAUTHBEARER and issuer discovery (xoauth2_mail.E040-E049) ----------------------------


@register(Tags.compatibility)
def check_standards_settings(**kwargs: Any) -> list[CheckMessage]:
    """SASL_MECHANISM of every provider, ISSUER of oauth2, DISCOVERY_CACHE_SECONDS: the
    form only, no network."""
    value = getattr(settings, "XOAUTH2_MAIL", {})
    if not isinstance(value, Mapping):
        return []  # reported as E001
    messages: list[CheckMessage] = []
    providers = value.get("PROVIDERS", {})
    if not isinstance(providers, Mapping):
        providers = {}  # reported as E005
    for provider_id, values in providers.items():
        if not isinstance(values, Mapping):
            continue  # reported as E009
        label = f"XOAUTH2_MAIL['PROVIDERS'][{provider_id!r}]"
        mechanism = values.get("SASL_MECHANISM")
        if mechanism is not None and mechanism not in SASL_MECHANISM_VALUES:
            messages.append(
                _error(
                    40,
                    f"{label}['SASL_MECHANISM'] is {mechanism!r}.",
                    f"Use one of {', '.join(map(repr, SASL_MECHANISM_VALUES))} (exactly so "
                    "spelled); 'auto' takes XOAUTH2 when the server offers it, else "
                    "OAUTHBEARER.",
                )
            )
        messages += _check_issuer(provider_id, label, values)
    cache_seconds = value.get("DISCOVERY_CACHE_SECONDS", DEFAULTS["DISCOVERY_CACHE_SECONDS"])
    if not _is_number(cache_seconds) or cache_seconds <= 0:
        messages.append(
            _error(
                44,
                "XOAUTH2_MAIL['DISCOVERY_CACHE_SECONDS'] must be a positive number of seconds, "
                f"not {cache_seconds!r}.",
                "Remove it to reuse discovered metadata for an hour (3600).",
            )
        )
    return messages


def _check_issuer(provider_id: Any, label: str, values: Mapping[str, Any]) -> list[CheckMessage]:
    issuer = values.get("ISSUER")
    if provider_id == "oauth2" and not issuer and not values.get("TOKEN_URL"):
        return [
            _error(
                43,
                f"{label} has neither ISSUER nor TOKEN_URL.",
                "Set ISSUER to the authorization server's issuer URL (its endpoints are then "
                "read from its metadata), or set TOKEN_URL (and AUTHORIZATION_URL, ...).",
            )
        ]
    if issuer is None:
        return []
    if provider_id != "oauth2":  # dev knows its URLs from BASE_URL
        return [
            _error(
                42,
                f"{label} sets ISSUER, which only the oauth2 provider reads.",
                "Remove it; this provider knows its own endpoints.",
            )
        ]
    parts = urlsplit(issuer) if isinstance(issuer, str) else None
    secure = parts is not None and (
        parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname or ""))
    )
    if parts is None or not secure or not parts.hostname or parts.query or parts.fragment:
        return [
            _error(
                41,
                f"{label}['ISSUER'] must be an https URL without query or fragment "
                f"(RFC 8414 section 2), not {issuer!r}.",
                "e.g. 'https://id.example.com/realms/mail' for Keycloak: the issuer exactly as "
                "the server's metadata names it. http is accepted for loopback servers only.",
            )
        ]
    return []


# Checks of the newcomer's common mistakes (W020-W029, E020-E029). ------------------------


def _keys_of_other_providers(provider_id: str, values: Mapping[str, Any]) -> list[CheckMessage]:
    """A key that another provider reads (``TENANT`` under ``google``) is ignored here:
    say whose key it is, since it was probably meant for that provider."""
    known = PROVIDER_SETTINGS[provider_id]
    messages: list[CheckMessage] = []
    # ISSUER elsewhere than under oauth2 is an error of its own (E042), not reported twice.
    for key in sorted(set(values) & PROVIDER_KEYS - known - {"ISSUER"}):
        owners = sorted(other for other, keys in PROVIDER_SETTINGS.items() if key in keys)
        messages.append(
            Warning(
                f"XOAUTH2_MAIL['PROVIDERS'][{provider_id!r}] has {key!r}, a setting of "
                f"{' and '.join(owners)} that {provider_id} does not read; it is ignored.",
                hint=f"Move it under {' or '.join(repr(o) for o in owners)}, or remove it. "
                f"{provider_id} reads: {', '.join(sorted(known))}.",
                id="xoauth2_mail.W020",
            )
        )
    return messages


# Shared sending limits (sending/limits.py). -----------------------------------

# Below this, renewing a session slot every third of it leaves too little time
# for a database round trip under load.
MIN_SESSION_LEASE = 5


def _whole_number(value: Any) -> bool:
    return _is_number(value, int) and 0 < value <= 32767


@register(Tags.compatibility)
def check_sending_limits(**kwargs: Any) -> list[CheckMessage]:
    value = getattr(settings, "XOAUTH2_MAIL", {})
    if not isinstance(value, Mapping):
        return []  # reported as E001
    messages: list[CheckMessage] = []
    providers = value.get("PROVIDERS", {})
    for provider_id, values in providers.items() if isinstance(providers, Mapping) else ():
        if not isinstance(values, Mapping):
            continue  # reported as E009
        label = f"XOAUTH2_MAIL['PROVIDERS'][{provider_id!r}]"
        for key, number, what in (
            ("RATE_LIMIT", 55, "messages per minute per mailbox"),
            ("MAX_SESSIONS", 56, "concurrent SMTP sessions per mailbox"),
        ):
            limit = values.get(key)
            if limit is not None and not _whole_number(limit):
                messages.append(
                    _error(
                        number,
                        f"{label}[{key!r}] must be a whole number of {what} (1 to 32767) "
                        f"or None for no limit, not {limit!r}.",
                        "Remove it to use the provider's default (Microsoft: RATE_LIMIT 30, "
                        "MAX_SESSIONS 3; others: none).",
                    )
                )
    wait = value.get("LIMIT_WAIT", DEFAULTS["LIMIT_WAIT"])
    if not _is_number(wait) or wait <= 0:
        messages.append(
            _error(
                57,
                f"XOAUTH2_MAIL['LIMIT_WAIT'] must be a positive number of seconds, not {wait!r}.",
                f"Remove it to use the default ({DEFAULTS['LIMIT_WAIT']:g} s).",
            )
        )
    lease = value.get("SESSION_LEASE", DEFAULTS["SESSION_LEASE"])
    if not _is_number(lease) or lease < MIN_SESSION_LEASE:
        messages.append(
            _error(
                58,
                f"XOAUTH2_MAIL['SESSION_LEASE'] must be at least {MIN_SESSION_LEASE} seconds, "
                f"not {lease!r}.",
                f"Remove it to use the default ({DEFAULTS['SESSION_LEASE']:g} s).",
            )
        )
    return messages


# Queued sending (TaskEmailBackend, the outbox): ids E050-E054, W050-W054. ----------


@register(Tags.compatibility)
def check_outbox(**kwargs: Any) -> list[CheckMessage]:
    value = getattr(settings, "XOAUTH2_MAIL", {})
    if not isinstance(value, Mapping):
        return []  # reported as E001
    messages: list[CheckMessage] = []
    lease = value.get("OUTBOX_LEASE", DEFAULTS["OUTBOX_LEASE"])
    if not _is_number(lease) or lease <= 0:
        messages.append(
            _error(
                50,
                "XOAUTH2_MAIL['OUTBOX_LEASE'] must be a positive number of seconds, "
                f"not {lease!r}.",
                f"Remove it to use the default ({DEFAULTS['OUTBOX_LEASE']!r}).",
            )
        )
    elif lease < MIN_SAFE_LEASE:
        messages.append(
            Warning(
                f"XOAUTH2_MAIL['OUTBOX_LEASE'] is {lease!r} s: a worker that is still sending "
                "can lose its claim (the message is then withdrawn and sent by another "
                "worker, never twice, but later than needed).",
                hint=f"Use at least {MIN_SAFE_LEASE} s, or the default "
                f"({DEFAULTS['OUTBOX_LEASE']!r}).",
                id="xoauth2_mail.W050",
            )
        )
    attempts = value.get("OUTBOX_MAX_ATTEMPTS", DEFAULTS["OUTBOX_MAX_ATTEMPTS"])
    if not _is_number(attempts, int) or attempts < 1:
        messages.append(
            _error(
                51,
                "XOAUTH2_MAIL['OUTBOX_MAX_ATTEMPTS'] must be a whole number of at least 1, "
                f"not {attempts!r}.",
                f"Remove it to use the default ({DEFAULTS['OUTBOX_MAX_ATTEMPTS']!r}).",
            )
        )
    delays = value.get("OUTBOX_RETRY_DELAYS", DEFAULTS["OUTBOX_RETRY_DELAYS"])
    if not _is_seconds_list(delays):
        messages.append(
            _error(
                52,
                f"XOAUTH2_MAIL['OUTBOX_RETRY_DELAYS'] must be a list of seconds, not {delays!r}.",
                "e.g. [60, 300, 900]: retry a queued message that failed for now after a "
                "minute, then 5, then 15 minutes (the last entry repeats).",
            )
        )
    return messages + _check_tasks_framework()


# Room for a token refresh and a slow SMTP exchange within one claim.
MIN_SAFE_LEASE = 60
TASK_BACKEND_PATH = "django_xoauth2_mail.backends.TaskEmailBackend"


def _check_tasks_framework() -> list[CheckMessage]:
    configured = [getattr(settings, "EMAIL_BACKEND", "")]
    mailers = getattr(settings, "MAILERS", None)
    if isinstance(mailers, Mapping):
        configured += [m.get("BACKEND", "") for m in mailers.values() if isinstance(m, Mapping)]
    if TASK_BACKEND_PATH not in configured:
        return []
    if importlib.util.find_spec("django.tasks") or importlib.util.find_spec("django_tasks"):
        return []
    return [
        _error(
            53,
            "TaskEmailBackend needs Django's Tasks framework: django.tasks (Django 6.0+) or "
            "the django-tasks backport, and neither is installed.",
            'On Django 5.2: pip install "django-xoauth2-mail[tasks]" "django-tasks-db[compat]"; '
            'on Django 6.x: pip install "django-xoauth2-mail[tasks]". Then add '
            "'django_tasks_db' (and on 5.2 'django_tasks') to INSTALLED_APPS and configure "
            "settings.TASKS.",
        )
    ]
