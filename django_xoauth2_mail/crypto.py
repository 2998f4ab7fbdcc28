"""Tokens are encrypted at rest with Fernet (AES-128-CBC + HMAC-SHA256).

Keys come from ``XOAUTH2_MAIL["ENCRYPTION_KEYS"]`` (newest first), or, when
that is empty, are derived from ``SECRET_KEY`` followed by
``SECRET_KEY_FALLBACKS``: rotating the secret key the Django way (new key in
``SECRET_KEY``, old one in the fallbacks) keeps every stored token readable,
and ``manage.py`` re-saving a mailbox re-encrypts it under the newest key.
"""

from __future__ import annotations

import base64
import functools
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.db import models
from django.views.decorators.debug import sensitive_variables

from django_xoauth2_mail.conf import conf
from django_xoauth2_mail.exceptions import EncryptionKeyError

# Marks ciphertext in serialized output (dumpdata), so loaddata can tell it
# from a clear value and never encrypts twice.
SERIALIZED_PREFIX = "fernet:"


@functools.lru_cache(maxsize=8)
def derive_key(secret: str) -> bytes:
    """A Fernet key derived from a Django secret key, unique to this package."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"django-xoauth2-mail",
        info=b"mailbox-token-encryption",
    )
    return base64.urlsafe_b64encode(hkdf.derive(secret.encode()))


def configured_keys() -> tuple[bytes, ...]:
    if conf.ENCRYPTION_KEYS:
        return tuple(key.encode() if isinstance(key, str) else key for key in conf.ENCRYPTION_KEYS)
    secrets = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
    return tuple(derive_key(secret) for secret in secrets if secret)


@functools.lru_cache(maxsize=8)
def _fernet_for(keys: tuple[bytes, ...]) -> MultiFernet:
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except (ValueError, TypeError):
        raise EncryptionKeyError(
            "XOAUTH2_MAIL['ENCRYPTION_KEYS'] holds a value that is not a Fernet key "
            "(32 url-safe base64-encoded bytes). Generate one with "
            "`python -c 'from cryptography.fernet import Fernet; "
            "print(Fernet.generate_key().decode())'`."
        ) from None


def fernet() -> MultiFernet:
    # Never empty: Django refuses to run with an empty SECRET_KEY.
    return _fernet_for(configured_keys())


@sensitive_variables()
def encrypt(value: str) -> str:
    return fernet().encrypt(value.encode()).decode("ascii")


@sensitive_variables()
def decrypt(value: str) -> str:
    try:
        return fernet().decrypt(value.encode("ascii")).decode()
    except (InvalidToken, UnicodeEncodeError):
        raise EncryptionKeyError(
            "A stored mailbox token cannot be decrypted with the configured keys. "
            "If you changed SECRET_KEY, put the old one in SECRET_KEY_FALLBACKS; if you "
            "set XOAUTH2_MAIL['ENCRYPTION_KEYS'], keep the old key after the new one. "
            "Otherwise reconnect the mailbox."
        ) from None


@sensitive_variables()
def is_decryptable(value: str | None) -> bool:
    """True when stored ciphertext (or no value) can be read with the configured keys."""
    if value is None:
        return True
    try:
        fernet().decrypt(value.encode("ascii"))
    except (InvalidToken, UnicodeEncodeError):
        return False
    return True


@sensitive_variables()
def rotate(value: str) -> str:
    """Re-encrypt ciphertext under the newest key."""
    return fernet().rotate(value.encode("ascii")).decode("ascii")


if TYPE_CHECKING:
    _TextField = models.TextField[str | None, str | None]
else:
    _TextField = models.TextField


class EncryptedTextField(_TextField):
    """A text field whose value is encrypted in the database.

    Assign and read clear text; the database, fixtures and ``dumpdata`` only
    ever see ciphertext.
    """

    @sensitive_variables()
    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> str | None:
        return None if value is None else decrypt(value)

    @sensitive_variables()
    def to_python(self, value: Any) -> str | None:
        if isinstance(value, str) and value.startswith(SERIALIZED_PREFIX):
            return decrypt(value.removeprefix(SERIALIZED_PREFIX))
        return None if value is None else str(value)

    @sensitive_variables()
    def get_prep_value(self, value: Any) -> str | None:
        value = super().get_prep_value(value)
        return None if value is None else encrypt(str(value))

    @sensitive_variables()
    def value_to_string(self, obj: models.Model) -> str:
        value = self.value_from_object(obj)
        return "" if value is None else SERIALIZED_PREFIX + encrypt(value)
