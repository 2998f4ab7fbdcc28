"""Which address and which account a Microsoft consent names, through the real msal code
exchange against a local Entra stand-in whose ID token carries the claims under test."""

from __future__ import annotations

import base64
import json
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest

from django_xoauth2_mail.consent.flows import save_consent
from django_xoauth2_mail.providers.microsoft import MicrosoftProvider
from django_xoauth2_mail.testing.fixtures import TEST_CLIENT_ID, TEST_CLIENT_SECRET
from tests.providers.conftest import LocalJSONServer

TENANT_ID = "4f2b7c1e-0000-4000-8000-00000000000a"
OBJECT_ID = "9a8b7c6d-0000-4000-8000-00000000000b"


def unsigned_jwt(claims: dict[str, Any]) -> str:
    parts = ({"alg": "none", "typ": "JWT"}, claims)
    encoded = (base64.urlsafe_b64encode(json.dumps(p).encode()).rstrip(b"=") for p in parts)
    return ".".join(part.decode() for part in encoded) + "."


class EntraStandIn(LocalJSONServer):
    """Discovery and a token endpoint that redeems any code, with ``claims`` in the ID token."""

    def __init__(self, ssl_context: ssl.SSLContext) -> None:
        super().__init__(ssl_context)
        self.claims: dict[str, Any] = {}

    def answer(self, method: str, path: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        tenant, _, rest = path.lstrip("/").partition("/")
        issuer = f"{self.base_url}/{tenant}/v2.0"
        if rest == "v2.0/.well-known/openid-configuration":
            prefix = f"{self.base_url}/{tenant}/oauth2/v2.0"
            return 200, {
                "issuer": issuer,
                "authorization_endpoint": f"{prefix}/authorize",
                "token_endpoint": f"{prefix}/token",
            }
        if rest == "oauth2/v2.0/token" and form.get("grant_type") == "authorization_code":
            now = int(time.time())
            claims = {"iss": issuer, "aud": TEST_CLIENT_ID, "sub": "s", "iat": now}
            id_token = unsigned_jwt({**claims, "exp": now + 600, **self.claims})
            return 200, {
                "access_token": "access",
                "refresh_token": "refresh",
                "expires_in": 3600,
                "token_type": "Bearer",
                "scope": "https://outlook.office.com/SMTP.Send",
                "id_token": id_token,
            }
        return 404, {"error": "not_found"}


@pytest.fixture
def entra(tls_certificate: tuple[str, str]) -> Iterator[EntraStandIn]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_certificate)
    with EntraStandIn(context) as server:
        yield server


def consent_with(entra: EntraStandIn, ca_file: str, claims: dict[str, Any]) -> Any:
    entra.claims = claims
    provider = MicrosoftProvider(
        {
            "CLIENT_ID": TEST_CLIENT_ID,
            "CLIENT_SECRET": TEST_CLIENT_SECRET,
            "AUTHORITY_HOST": entra.base_url,
            "HTTP_CA_FILE": ca_file,
        }
    )
    return provider.exchange_code(code="c", redirect_uri="http://localhost/", code_verifier="v")


@pytest.mark.parametrize(
    ("claims", "email", "verified"),
    [
        # Entra vouches for these.
        (
            {"verified_primary_email": ["boss@corp.example"], "email": "alias@corp.example"},
            "boss@corp.example",
            True,
        ),
        ({"email": "boss@corp.example", "xms_edov": True}, "boss@corp.example", True),
        ({"email": "boss@corp.example", "xms_edov": "1"}, "boss@corp.example", True),
        # Any tenant's administrator can write these: kept, but marked unverified.
        ({"email": "victim@bank.example"}, "victim@bank.example", False),
        ({"email": "victim@bank.example", "xms_edov": False}, "victim@bank.example", False),
        (
            {"email": "victim@bank.example", "preferred_username": "me@rogue.example"},
            "victim@bank.example",
            False,
        ),
        ({"preferred_username": "me@corp.example"}, "me@corp.example", False),
        ({"preferred_username": "not-an-address"}, None, False),
    ],
)
def test_the_address_is_verified_only_when_entra_vouches_for_it(
    entra, tls_certificate, claims, email, verified
):
    result = consent_with(entra, tls_certificate[0], claims)

    assert (result.email, result.email_verified) == (email, verified)


def test_tenant_and_object_id_name_the_account(entra, tls_certificate):
    claims = {"email": "boss@corp.example", "tid": TENANT_ID, "oid": OBJECT_ID}

    result = consent_with(entra, tls_certificate[0], claims)

    assert result.account_id == f"{TENANT_ID}/{OBJECT_ID}"
    assert consent_with(entra, tls_certificate[0], {"email": "a@b.example"}).account_id is None


@pytest.mark.django_db
def test_the_account_id_is_recorded_on_the_mailbox(entra, tls_certificate):
    claims = {"email": "boss@corp.example", "tid": TENANT_ID, "oid": OBJECT_ID}

    mailbox = save_consent("microsoft", consent_with(entra, tls_certificate[0], claims), None)

    mailbox.refresh_from_db()
    assert mailbox.account_id == f"{TENANT_ID}/{OBJECT_ID}"
