"""Minimal Django settings for the benchmark (``python -m benchmarks.run`` selects them).

The database is SQLite in the directory named by ``XOAUTH2_MAIL_BENCHMARK_DIR``, which
the benchmark creates, shares with the child processes it starts, and removes at the end.
Mail settings that depend on the run (the sink's port, the OAuth2 server's URLs) are set by
the benchmark at run time.
"""

import importlib.util
import os
import tempfile

import django

SECRET_KEY = "benchmark-only-secret-key"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["django_xoauth2_mail"]

_directory = os.environ.get("XOAUTH2_MAIL_BENCHMARK_DIR") or tempfile.mkdtemp(
    prefix="xoauth2-mail-benchmark-"
)
DATABASES: dict[str, dict[str, object]] = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(_directory, "benchmark.sqlite3"),
    }
}

# Django's SMTP backend, as a site would configure it for a submission server.
EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
EMAIL_HOST = "127.0.0.1"
EMAIL_PORT = 587  # replaced by the sink's port
EMAIL_USE_TLS = True
EMAIL_TIMEOUT = 30
DEFAULT_FROM_EMAIL = "sender@bench.invalid"

XOAUTH2_MAIL: dict[str, object] = {"PROVIDERS": {}}

# The queued case (benchmarks/queued.py): TaskEmailBackend with django-tasks-db workers,
# when installed. Its worker processes share the SQLite file: WAL lets readers and the
# one writer proceed together, synchronous=NORMAL spares an fsync per commit (a lost
# benchmark database costs nothing), and a writer waits (up to 30 s) rather than fail.
if importlib.util.find_spec("django_tasks_db"):
    if django.VERSION < (6, 0):
        INSTALLED_APPS.append("django_tasks")
    INSTALLED_APPS.append("django_tasks_db")
    TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
