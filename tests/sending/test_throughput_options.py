"""max_connections, keep_alive and rate_limit: behaviour, not speed (see benchmarks/)."""

from __future__ import annotations

import asyncio
import time

import pytest
from django.core.mail import EmailMessage
from django.db import connection
from django.test.utils import CaptureQueriesContext

from django_xoauth2_mail.backends import EmailBackend
from django_xoauth2_mail.devserver.smtp import DROP
from django_xoauth2_mail.exceptions import ConfigurationError
from django_xoauth2_mail.sending import ratelimit
from django_xoauth2_mail.sending.loop import mail_loop
from django_xoauth2_mail.sending.pool import pool
from tests.clocks import AsyncVirtualClock
from tests.conftest import SENDER

pytestmark = pytest.mark.django_db(transaction=True)


def batch(count: int, prefix: str = "M") -> list[EmailMessage]:
    return [EmailMessage(f"{prefix}{n}", "Body", SENDER, ["to@example.org"]) for n in range(count)]


@pytest.fixture(autouse=True)
def empty_pool():
    yield
    mail_loop.run(pool.close_all())


def test_max_connections_spreads_a_batch_over_sessions(mailbox, xoauth2_smtp_server):
    assert EmailBackend(max_connections=4).send_messages(batch(40)) == 40

    assert len(xoauth2_smtp_server.messages) == 40
    subjects = sorted(
        m.data.split(b"Subject: ")[1].split(b"\r\n")[0] for m in xoauth2_smtp_server.messages
    )
    assert subjects == sorted(f"M{n}".encode() for n in range(40))  # each exactly once
    assert len(xoauth2_smtp_server.auth_attempts) == 4


def test_max_connections_never_opens_more_sessions_than_messages(mailbox, xoauth2_smtp_server):
    assert EmailBackend(max_connections=8).send_messages(batch(2)) == 2
    # The first session may well send both before a second one is needed.
    assert 1 <= len(xoauth2_smtp_server.auth_attempts) <= 2


def test_max_connections_with_a_refused_token_fails_once_not_n_times(settings, mailbox):
    from django_xoauth2_mail.exceptions import SMTPAuthenticationFailed
    from django_xoauth2_mail.testing import XOAuth2SMTPServer

    with XOAuth2SMTPServer(lambda user, token: False) as server:
        settings.XOAUTH2_MAIL["PROVIDERS"]["oauth2"]["SMTP_PORT"] = server.port
        with pytest.raises(SMTPAuthenticationFailed) as caught:
            EmailBackend(max_connections=8).send_messages(batch(20))
    assert len(server.auth_attempts) == 2  # one session: try, refresh, retry
    assert len(caught.value.failures) == 20 and caught.value.sent == 0


def test_keep_alive_reuses_a_session_across_backends_and_calls(mailbox, xoauth2_smtp_server):
    for n in range(3):
        assert EmailBackend(keep_alive=True).send_messages(batch(1, f"K{n}")) == 1

    assert len(xoauth2_smtp_server.messages) == 3
    assert len(xoauth2_smtp_server.auth_attempts) == 1
    assert pool.idle_count() == 1


def test_kept_alive_session_closes_after_its_idle_timeout(mailbox, xoauth2_smtp_server):
    EmailBackend(keep_alive=0.2).send_messages(batch(1))
    assert pool.idle_count() == 1
    time.sleep(0.5)
    assert pool.idle_count() == 0

    EmailBackend(keep_alive=0.2).send_messages(batch(1))
    assert len(xoauth2_smtp_server.auth_attempts) == 2


def test_kept_alive_session_dropped_by_the_server_is_replaced(mailbox, xoauth2_smtp_server):
    xoauth2_smtp_server.scripted_replies["AFTER_MESSAGE"] = [DROP]
    EmailBackend(keep_alive=True).send_messages(batch(1, "A"))
    time.sleep(0.1)  # the server has closed the idle connection

    assert EmailBackend(keep_alive=True).send_messages(batch(1, "B")) == 1
    assert len(xoauth2_smtp_server.messages) == 2
    assert len(xoauth2_smtp_server.auth_attempts) == 2


def test_kept_alive_sessions_are_safe_under_threads(mailbox, xoauth2_smtp_server):
    import threading

    backend = EmailBackend(keep_alive=True)
    errors: list[BaseException] = []

    def send(n: int) -> None:
        try:
            backend.send_messages(batch(5, f"T{n}-"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert len(xoauth2_smtp_server.messages) == 40


def test_rate_limit_spaces_messages_per_mailbox(monkeypatch, mailbox, xoauth2_smtp_server):
    monkeypatch.setattr(ratelimit, "WINDOW", 0.4)  # a 0.4 s "minute" keeps the test short

    started = time.monotonic()
    assert EmailBackend(rate_limit=2).send_messages(batch(5)) == 5
    elapsed = time.monotonic() - started

    # 2 per window: messages 3-4 wait one window, message 5 a second one.
    assert elapsed >= 0.75
    times = [m.received_at for m in xoauth2_smtp_server.messages]
    assert (times[4] - times[0]).total_seconds() >= 0.5


def test_sliding_window_limiter_admits_at_most_n_per_window():
    clock = AsyncVirtualClock()
    limiter = ratelimit.SlidingWindowLimiter(3, clock=clock)

    async def starts() -> list[float]:
        result = []
        for _ in range(7):
            await limiter.wait()
            result.append(clock.now)
        return result

    assert asyncio.run(starts()) == [0, 0, 0, 60, 60, 60, 120]
    assert clock.sleeps == [60, 60]


def test_the_window_slides():
    """Three starts at 0, 20 and 40 s: the fourth waits for 60 s, the fifth for 80 s."""
    clock = AsyncVirtualClock()
    limiter = ratelimit.SlidingWindowLimiter(3, clock=clock)

    async def starts() -> list[float]:
        result = []
        for at in (0, 20, 40, None, None):
            clock.now = clock.now if at is None else at
            await limiter.wait()
            result.append(clock.now)
        return result

    assert asyncio.run(starts()) == [0, 20, 40, 60, 80]
    assert clock.sleeps == [20, 20]


def test_a_batch_costs_no_database_write_per_message(mailbox, xoauth2_smtp_server):
    backend = EmailBackend()
    backend.send_messages(batch(1))  # first send: token refresh and last_sent_at
    with CaptureQueriesContext(connection) as queries:
        assert backend.send_messages(batch(20)) == 20
    assert len(queries) == 1, [q["sql"] for q in queries]  # the mailbox lookup


@pytest.mark.parametrize(
    "options",
    [{"max_connections": 0}, {"max_connections": "8"}, {"keep_alive": -1}, {"keep_alive": "yes"}],
)
def test_bad_option_values_are_refused(options):
    with pytest.raises(ConfigurationError):
        EmailBackend(**options)


def test_a_provider_cap_limits_max_connections(monkeypatch, mailbox, xoauth2_smtp_server):
    from django_xoauth2_mail.providers.oauth2 import OAuth2Provider

    monkeypatch.setattr(OAuth2Provider, "max_sessions_per_mailbox", 2)
    assert EmailBackend(max_connections=8).send_messages(batch(30)) == 30
    assert len(xoauth2_smtp_server.auth_attempts) == 2
