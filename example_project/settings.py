"""Settings of the example project: every email goes out through django_xoauth2_mail.

Out of the box it sends through the bundled development server (``manage.py
xoauth2_devserver``, the ``dev`` provider). What varies between runs comes from
environment variables, so scripts/demo can use a temporary folder and free ports:

- ``EXAMPLE_VAR_DIR``: where the SQLite database lives (default: example_project/var/)
- ``EXAMPLE_MAILBOX``: the sending address (default: demo@example.com)
- ``EXAMPLE_DEV_BASE_URL``, ``EXAMPLE_DEV_SMTP_PORT``: where the dev server listens
  (default: http://127.0.0.1:8765 and port 2525, the dev provider's own defaults)
- ``GOOGLE_CLIENT_ID`` / ``GOOGLE_CLIENT_SECRET`` and ``MICROSOFT_CLIENT_ID`` /
  ``MICROSOFT_CLIENT_SECRET`` / ``MICROSOFT_TENANT``: enable those providers
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import django

BASE_DIR = Path(__file__).resolve().parent
VAR_DIR = Path(os.environ.get("EXAMPLE_VAR_DIR") or BASE_DIR / "var")
VAR_DIR.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its folder

# A development-only project: a fixed key and DEBUG are fine here, never in production.
SECRET_KEY = os.environ.get("EXAMPLE_SECRET_KEY", "example-project-development-only")
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_xoauth2_mail",
    "example_project",  # its templates and the send_demo_mail command
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "example_project.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": VAR_DIR / "db.sqlite3"},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"  # also the zone of the dev server's log lines (Django sets TZ)
STATIC_URL = "static/"

# Mail -----------------------------------------------------------------------------------

DEMO_MAILBOX = os.environ.get("EXAMPLE_MAILBOX", "demo@example.com")
DEFAULT_FROM_EMAIL = DEMO_MAILBOX  # password-reset emails and send_mail(from_email=None)
SERVER_EMAIL = DEMO_MAILBOX  # mail_admins() and error reports

if django.VERSION >= (6, 1):
    # Django 6.1 configures backends by alias; it refuses EMAIL_* settings beside MAILERS.
    MAILERS = {
        "default": {
            "BACKEND": "django_xoauth2_mail.backends.EmailBackend",
            "OPTIONS": {"mailbox": DEMO_MAILBOX},
        }
    }
else:
    EMAIL_BACKEND = "django_xoauth2_mail.backends.EmailBackend"

# An empty dict is a working configuration: the dev provider's defaults match the defaults
# of `manage.py xoauth2_devserver`. Only a server on other ports needs settings.
DEV_PROVIDER: dict[str, Any] = {}
if os.environ.get("EXAMPLE_DEV_BASE_URL"):
    DEV_PROVIDER["BASE_URL"] = os.environ["EXAMPLE_DEV_BASE_URL"]
if os.environ.get("EXAMPLE_DEV_SMTP_PORT"):
    DEV_PROVIDER["SMTP_PORT"] = int(os.environ["EXAMPLE_DEV_SMTP_PORT"])

XOAUTH2_MAIL: dict[str, Any] = {
    "PROVIDERS": {"dev": DEV_PROVIDER},
    # Messages whose From matches no connected mailbox go out through this one.
    "DEFAULT_MAILBOX": DEMO_MAILBOX,
    # The dev server's tokens live 120 s (20 s in scripts/demo); the default skew (300 s)
    # would refresh one before every send. With Google or Microsoft (1-hour tokens), drop
    # this line and keep the default.
    "TOKEN_REFRESH_SKEW": 10,
}

# Real providers instead of (or beside) the dev server: register an OAuth client with the
# provider (docs/providers/google.rst, microsoft.rst), export its id and secret, then
# `python manage.py connect_mailbox google --email you@gmail.com` and set EXAMPLE_MAILBOX
# to that address. Keep secrets in the environment, never in this file.
if os.environ.get("GOOGLE_CLIENT_ID"):
    XOAUTH2_MAIL["PROVIDERS"]["google"] = {
        "CLIENT_ID": os.environ["GOOGLE_CLIENT_ID"],
        "CLIENT_SECRET": os.environ.get("GOOGLE_CLIENT_SECRET", ""),
    }
if os.environ.get("MICROSOFT_CLIENT_ID"):
    XOAUTH2_MAIL["PROVIDERS"]["microsoft"] = {
        "CLIENT_ID": os.environ["MICROSOFT_CLIENT_ID"],
        "CLIENT_SECRET": os.environ.get("MICROSOFT_CLIENT_SECRET", ""),
        # "common" for any Microsoft account; your tenant's id or domain for one organisation.
        "TENANT": os.environ.get("MICROSOFT_TENANT", "common"),
    }
