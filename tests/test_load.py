"""Load and process death: many threads, one refresh; a dead process releases the lock."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
import time

import pytest
from django.core import mail
from django.db import connection
from django.utils import timezone

from django_xoauth2_mail.models import Mailbox
from django_xoauth2_mail.tokens import get_access_token
from tests.conftest import SENDER

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.slow
def test_32_threads_times_50_messages_arrive_once_with_one_refresh(
    mailbox, xoauth2_smtp_server, oauth2_server
):
    # Django's default SQLite settings: no "database is locked" under this load.
    assert connection.vendor != "sqlite" or "timeout" not in connection.settings_dict["OPTIONS"]
    start = threading.Barrier(32)
    errors: list[BaseException] = []
    sent: list[int] = []

    def sender(thread: int) -> None:
        start.wait(timeout=30)
        try:
            for n in range(50):
                sent.append(mail.send_mail(f"{thread}-{n}", "Body", SENDER, ["to@example.org"]))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)

    assert errors == []
    assert sum(sent) == 1600
    subjects = [
        m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0] for m in xoauth2_smtp_server.messages
    ]
    assert len(subjects) == 1600 and len(set(subjects)) == 1600  # each exactly once
    assert oauth2_server.token_request_count == 1


REFRESH_IN_CHILD = """
import os, sys, django
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
django.setup()
from django.conf import settings
settings.DATABASES["default"]["NAME"] = sys.argv[1]
settings.XOAUTH2_MAIL = {"PROVIDERS": {"oauth2": {
    "CLIENT_ID": "test-client", "CLIENT_SECRET": "test-secret", "TOKEN_URL": sys.argv[2],
    "SMTP_HOST": "127.0.0.1"}}, "TOKEN_REFRESH_ATTEMPTS": 1, "HTTP_TIMEOUT": 60}
from django_xoauth2_mail.models import Mailbox
from django_xoauth2_mail.tokens import get_access_token
from django_xoauth2_mail.tokens import get_access_token
print("refreshing", flush=True)
get_access_token(Mailbox.objects.get(email=sys.argv[3]))
print("done", flush=True)
"""


@pytest.mark.slow
def test_a_process_killed_while_refreshing_releases_the_lock(mailbox, oauth2_server):
    """The refresh lock is a database lock: it dies with the process holding it."""
    oauth2_server.rotate_refresh_tokens = False  # see docs/architecture.rst on rotation
    Mailbox.objects.filter(pk=mailbox.pk).update(
        access_token="expired", access_token_expires_at=timezone.now() - dt.timedelta(hours=1)
    )
    oauth2_server.token_response_delay = 30  # the child hangs inside the locked refresh
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            REFRESH_IN_CHILD,
            connection.settings_dict["NAME"],
            oauth2_server.token_url,
            SENDER,
        ],
        cwd=os.path.dirname(os.path.dirname(__file__)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "refreshing"
        deadline = time.monotonic() + 20
        while oauth2_server.token_request_count == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert oauth2_server.token_request_count == 1  # it holds the lock, waiting on HTTP
    finally:
        child.kill()
        child.wait(timeout=10)
    oauth2_server.token_response_delay = 0

    # Another sender now gets the lock (a held lock would raise "database is locked").
    fresh = get_access_token(Mailbox.objects.get(pk=mailbox.pk))
    assert fresh != "expired"
    mailbox.refresh_from_db()
    assert mailbox.status == "connected" and mailbox.refresh_token
