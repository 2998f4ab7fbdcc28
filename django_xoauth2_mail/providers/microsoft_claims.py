"""Who consented, read from a Microsoft ID token.

Entra ID's ``email`` claim is the user's ``mail`` attribute, which an administrator of
the user's tenant can set to any address, verified or not: with ``TENANT = "common"`` an
account of someone else's tenant can claim your address (the "nOAuth" mistake).
``preferred_username`` is the sign-in name, mutable and not necessarily a mailbox. So an
address counts as verified only when Entra vouches for it:

* the optional claim ``verified_primary_email`` (addresses Entra verified), or
* ``email`` with the optional claim ``xms_edov`` true (the address's domain is verified
  by the user's tenant), or with a standard ``email_verified`` true.

Otherwise the address is still returned, marked unverified, for the caller to decide.
The tenant id (``tid``) and object id (``oid``) together name the account for good
(Microsoft's recommended key); they become ``account_id``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class ConsentingAccount:
    email: str | None
    email_verified: bool
    account_id: str | None  # "TENANT_ID/OBJECT_ID"


def consenting_account(claims: Mapping[str, Any]) -> ConsentingAccount:
    """The address (verified if possible) and the stable id of the account in ``claims``."""
    account_id = _account_id(claims)
    verified = _first_address(claims.get("verified_primary_email"))
    if verified:
        return ConsentingAccount(verified, True, account_id)
    email = _first_address(claims.get("email"))
    if email and (_is_true(claims.get("xms_edov")) or _is_true(claims.get("email_verified"))):
        return ConsentingAccount(email, True, account_id)
    unverified = email or _first_address(claims.get("preferred_username"))
    return ConsentingAccount(unverified, False, account_id)


def _account_id(claims: Mapping[str, Any]) -> str | None:
    tenant, object_id = claims.get("tid"), claims.get("oid")
    if isinstance(tenant, str) and isinstance(object_id, str) and tenant and object_id:
        return f"{tenant}/{object_id}"
    return None


def _first_address(value: Any) -> str | None:
    """The first email address in a claim that holds one or a list of them."""
    values = value if isinstance(value, list) else [value]
    return next((v for v in values if isinstance(v, str) and "@" in v), None)


def _is_true(value: Any) -> bool:
    # JSON true, and the string forms some issuers use for boolean claims.
    return value is True or (isinstance(value, str) and value.lower() in ("true", "1"))
