"""pytest fixtures: ``pytest_plugins = ["django_xoauth2_mail.testing.fixtures"]``.

Each fixture is function-scoped and starts a fresh server on a free loopback port, so tests
neither share tokens nor messages and can run in parallel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from django_xoauth2_mail.testing import (
    SASL_MECHANISMS,
    OAuth2Server,
    XOAuth2SMTPServer,
    make_self_signed_certificate,
)

__all__ = [
    "TEST_CLIENT_ID",
    "TEST_CLIENT_SECRET",
    "oauth2_server",
    "smtp_sasl_mechanisms",
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
def smtp_sasl_mechanisms() -> tuple[str, ...]:
    """The SASL mechanisms ``xoauth2_smtp_server`` offers: both by default. Override this
    fixture, or parametrize it (``@pytest.mark.parametrize("smtp_sasl_mechanisms",
    [("XOAUTH2",), ("OAUTHBEARER",)])``), to test against a server that offers one."""
    return SASL_MECHANISMS


@pytest.fixture
def xoauth2_smtp_server(
    oauth2_server: OAuth2Server, smtp_sasl_mechanisms: tuple[str, ...]
) -> Iterator[XOAuth2SMTPServer]:
    """A running plain-TCP XOAuth2SMTPServer that accepts tokens ``oauth2_server`` issued,
    with the mechanisms ``smtp_sasl_mechanisms`` names."""
    with XOAuth2SMTPServer(
        oauth2_server.validate_access_token,
        mechanisms=smtp_sasl_mechanisms,
        openid_configuration=f"{oauth2_server.base_url}/.well-known/openid-configuration",
    ) as server:
        yield server


@pytest.fixture
def tls_certificate(tmp_path: Path) -> tuple[str, str]:
    """A self-signed (certfile, keyfile) pair for localhost / 127.0.0.1; trust the certfile."""
    return make_self_signed_certificate(tmp_path / "tls")
