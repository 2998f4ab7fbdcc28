"""``EMAIL_BACKEND`` (or a mailer) names the backend, but the app is not in
``INSTALLED_APPS``: the backend refuses with the fix instead of Django's model
RuntimeError."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import django
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test.utils import override_settings

from django_xoauth2_mail.backends import EmailBackend

ROOT = Path(__file__).resolve().parent.parent
FIX = (
    "django_xoauth2_mail is not in INSTALLED_APPS, so its Mailbox model, where the sending "
    'accounts are kept, cannot be used. Add "django_xoauth2_mail" to INSTALLED_APPS in your '
    "settings, then run `python manage.py migrate`."
)
BACKEND = "django_xoauth2_mail.backends.EmailBackend"


def test_a_fresh_process_gets_the_fix_not_a_runtime_error(tmp_path):
    backend = (
        f'MAILERS = {{"default": {{"BACKEND": "{BACKEND}"}}}}'
        if django.VERSION >= (6, 1)
        else f'EMAIL_BACKEND = "{BACKEND}"'
    )
    (tmp_path / "newcomer_settings.py").write_text(
        textwrap.dedent(f"""\
            SECRET_KEY = "x"
            INSTALLED_APPS = ["django.contrib.auth", "django.contrib.contenttypes"]
            DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3",
                                       "NAME": {str(tmp_path / "db.sqlite3")!r}}}}}
            XOAUTH2_MAIL = {{"PROVIDERS": {{"dev": {{}}}}}}
            {backend}
        """)
    )
    script = (
        "import django; django.setup(); from django.core.mail import send_mail; "
        "send_mail('Hi', 'Body', 'you@example.com', ['to@example.com'])"
    )
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="newcomer_settings",
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == f"django.core.exceptions.ImproperlyConfigured: {FIX}"
    assert "RuntimeError" not in result.stderr


def test_the_backend_checks_again_when_it_is_built(settings):
    apps_without = [app for app in settings.INSTALLED_APPS if app != "django_xoauth2_mail"]
    with override_settings(INSTALLED_APPS=apps_without), pytest.raises(ImproperlyConfigured) as e:
        EmailBackend()
    caught = e
    assert str(caught.value) == FIX
    EmailBackend()  # installed again
