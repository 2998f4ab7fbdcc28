"""Settings for the test-suite: SQLite by default, PostgreSQL when asked."""

import os

import django

SECRET_KEY = "tests-secret-key-not-for-production"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_xoauth2_mail",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
STATIC_URL = "/static/"
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

DATABASES: dict[str, dict[str, object]]
if os.environ.get("XOAUTH2_MAIL_TEST_POSTGRES"):
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": "xoauth2_mail",
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
            "USER": os.environ.get("PGUSER", "postgres"),
            "PASSWORD": os.environ.get("PGPASSWORD", ""),
        }
    }
else:
    TMPDIR = os.environ.get("TMPDIR", "/tmp")
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            # A file (not :memory:) so threads and child processes share it.
            "NAME": os.path.join(
                os.environ.get("TMPDIR", "/tmp"), f"xoauth2-mail-{os.getpid()}.sqlite3"
            ),
            "TEST": {
                "NAME": os.path.join(
                    os.environ.get("TMPDIR", "/tmp"), f"xoauth2-mail-test-{os.getpid()}.sqlite3"
                )
            },
        }
    }

if django.VERSION >= (6, 1):
    MAILERS = {"default": {"BACKEND": "django_xoauth2_mail.backends.EmailBackend"}}
else:
    EMAIL_BACKEND = "django_xoauth2_mail.backends.EmailBackend"
DEFAULT_FROM_EMAIL = "sender@example.com"
XOAUTH2_MAIL: dict[str, object] = {"PROVIDERS": {}}

# Django's default hasher costs about a second per user on a busy CI machine, and many
# tests create staff users; what is under test here is not password hashing.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

# Queued sending (TaskEmailBackend): django-tasks-db, on django.tasks (Django 6.x) or on
# the django-tasks backport (Django 5.2).
if django.VERSION < (6, 0):
    INSTALLED_APPS.append("django_tasks")
INSTALLED_APPS.append("django_tasks_db")
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default", "mail"]}}
