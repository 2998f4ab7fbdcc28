"""One sending process of tests/sending/test_limits_processes.py: its own Django, its
own connection to the test database, its own mail loop. Imports nothing of Django at
the top: a spawned child imports this module before ``django.setup()``."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any


class WaitRecorder(logging.Handler):
    """Keeps the limits' "waits for ..." log lines about one address."""

    def __init__(self, address: str) -> None:
        super().__init__(logging.DEBUG)
        self.address = address
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if self.address in line and "waits" in line:
            self.lines.append(line)


def send_from_child(config: dict[str, Any], number: int, start: Any, turn: Any, results: Any):
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    from django.conf import settings

    # pytest-django made the test database under another name: use the one it made.
    settings.DATABASES["default"]["NAME"] = config["db_name"]
    import django

    django.setup()
    settings.XOAUTH2_MAIL = config["xoauth2_mail"]
    from django.core.mail import EmailMessage
    from django.db import connections

    from django_xoauth2_mail.backends import EmailBackend
    from django_xoauth2_mail.sending import limits

    limits.WINDOW = config["window"]  # a short "minute" keeps the test short
    recorder = WaitRecorder(config["second"])
    limits.logger.addHandler(recorder)
    limits.logger.setLevel(logging.DEBUG)
    second: list[Any] = []

    def send_second() -> None:
        """Waits until the first mailbox is throttled, then sends one message."""
        try:
            turn.wait(timeout=120)
            message = EmailMessage(f"B{number}", "Body", config["second"], ["to@example.org"])
            second.append(EmailBackend().send_messages([message]))
        except Exception as exc:  # reported to the parent, which asserts on it
            second.append(repr(exc))
        finally:
            connections.close_all()

    try:
        helper = threading.Thread(target=send_second) if number < config["second_senders"] else None
        if helper is not None:
            helper.start()
        messages = [
            EmailMessage(f"A{number}-{n}", "Body", config["first"], ["to@example.org"])
            for n in range(config["per_process"])
        ]
        start.wait(timeout=120)
        if config["keep_alive"]:  # like a web worker: one message a call, sessions kept
            sent = sum(EmailBackend(keep_alive=60).send_messages([m]) for m in messages)
        else:  # like a bulk job: one batch over up to three sessions
            sent = EmailBackend(max_connections=3).send_messages(messages)
        if helper is not None:
            helper.join(timeout=180)
        results.put(("ok", number, sent, second, recorder.lines))
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put(("error", number, repr(exc), second, recorder.lines))
    finally:
        connections.close_all()


def send_kept_alive_and_exit(config: dict[str, Any]) -> None:
    """Sends one message over a kept-alive session, then lets the process end normally."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    from django.conf import settings

    settings.DATABASES["default"]["NAME"] = config["db_name"]
    import django

    django.setup()
    settings.XOAUTH2_MAIL = config["xoauth2_mail"]
    from django.core.mail import EmailMessage

    from django_xoauth2_mail.backends import EmailBackend

    message = EmailMessage("Kept", "Body", config["first"], ["to@example.org"])
    assert EmailBackend(keep_alive=600).send_messages([message]) == 1


def send_kept_alive_and_stay(config: dict[str, Any], results: Any) -> None:
    """Sends one message over a kept-alive session, says so, and waits to be killed."""
    import time

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    from django.conf import settings

    settings.DATABASES["default"]["NAME"] = config["db_name"]
    import django

    django.setup()
    settings.XOAUTH2_MAIL = config["xoauth2_mail"]
    from django.core.mail import EmailMessage

    from django_xoauth2_mail.backends import EmailBackend

    message = EmailMessage("Kept", "Body", config["first"], ["to@example.org"])
    results.put(EmailBackend(keep_alive=600).send_messages([message]))
    time.sleep(120)
