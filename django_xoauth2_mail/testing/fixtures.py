"""pytest fixtures: ``pytest_plugins = ["django_xoauth2_mail.testing.fixtures"]``.

Each fixture is function-scoped and starts a fresh server on a free loopback port, so tests
neither share tokens nor messages and can run in parallel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from django_xoauth2_mail.testing import (
    OAuth2Server,
    XOAuth2SMTPServer,
    make_self_signed_certificate,
)

__all__ = [
    "TEST_CLIENT_ID",
    "TEST_CLIENT_SECRET",
    "oauth2_server",
    "tls_certificate",
    "xoauth2_smtp_server",
]

TEST_CLIENT_ID = "test-client"
TEST_CLIENT_SECRET = "test-secret"


@pytest.fixture
def oauth2_server() -> Iterator[OAuth2Server]:
    """A running OAuth2Server with one confidential client, test-client / test-secret."""
    with OAuth2Server() as server:
        server.add_client(TEST_CLIENT_ID, TEST_CLIENT_SECRET)
        yield server


@pytest.fixture
def xoauth2_smtp_server(oauth2_server: OAuth2Server) -> Iterator[XOAuth2SMTPServer]:
    """A running plain-TCP XOAuth2SMTPServer that accepts tokens ``oauth2_server`` issued."""
    with XOAuth2SMTPServer(oauth2_server.validate_access_token) as server:
        yield server


@pytest.fixture
def tls_certificate(tmp_path: Path) -> tuple[str, str]:
    """A self-signed (certfile, keyfile) pair for localhost / 127.0.0.1; trust the certfile."""
    return make_self_signed_certificate(tmp_path / "tls")
