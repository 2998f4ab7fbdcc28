from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.utils import timezone

from django_xoauth2_mail.models import Mailbox

pytest_plugins = ["django_xoauth2_mail.testing.fixtures"]

SENDER = "sender@example.com"


OUR_BACKEND = "django_xoauth2_mail.backends.EmailBackend"


@pytest.fixture
def real_backend(settings: Any) -> None:
    """Django's test setup swaps the backend for locmem: put ours back."""
    if django.VERSION >= (6, 1):
        settings.MAILERS = {"default": {"BACKEND": OUR_BACKEND}}
    else:
        settings.EMAIL_BACKEND = OUR_BACKEND


@pytest.fixture
def oauth2_settings(settings: Any, oauth2_server: Any, xoauth2_smtp_server: Any) -> dict[str, Any]:
    """XOAUTH2_MAIL pointing the ``oauth2`` provider at the local servers."""
    settings.XOAUTH2_MAIL = {
        "PROVIDERS": {
            "oauth2": {
                "CLIENT_ID": "test-client",
                "CLIENT_SECRET": "test-secret",
                "TOKEN_URL": oauth2_server.token_url,
                "AUTHORIZATION_URL": oauth2_server.authorization_url,
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": xoauth2_smtp_server.port,
                "SMTP_SECURITY": "none",
            }
        },
        # Tests that exercise retries keep them fast.
        "TOKEN_REFRESH_ATTEMPTS": 2,
        "SMTP_TIMEOUT": 5,
        "HTTP_TIMEOUT": 5,
    }
    return settings.XOAUTH2_MAIL  # type: ignore[no-any-return]


def make_mailbox(oauth2_server: Any, email: str = SENDER, *, fresh: bool = False) -> Mailbox:
    """A connected Mailbox whose refresh token the local OAuth2 server knows.

    ``fresh``: also cache a valid access token, so no refresh is needed.
    """
    issued = oauth2_server.issue_tokens(email)
    mailbox = Mailbox(email=email, provider="oauth2", refresh_token=issued["refresh_token"])
    if fresh:
        mailbox.access_token = issued["access_token"]
        mailbox.access_token_expires_at = timezone.now() + dt.timedelta(
            seconds=int(issued["expires_in"])
        )
    mailbox.save()
    return mailbox


@pytest.fixture
def mailbox(
    transactional_db: None, real_backend: None, oauth2_settings: dict[str, Any], oauth2_server: Any
) -> Iterator[Mailbox]:
    yield make_mailbox(oauth2_server)


@pytest.fixture
def post_sends() -> Iterator[list[dict[str, Any]]]:
    """The keyword arguments of every post_send signal sent during the test, in order."""
    from django_xoauth2_mail.signals import post_send

    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        seen.append(kwargs)

    post_send.connect(receiver)
    yield seen
    post_send.disconnect(receiver)
