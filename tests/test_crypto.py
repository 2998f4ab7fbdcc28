"""Tokens are encrypted at rest, readable across key rotation, never dumped in clear."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command
from django.db import connection

from django_xoauth2_mail.exceptions import EncryptionKeyError
from django_xoauth2_mail.models import Mailbox

pytestmark = pytest.mark.django_db(transaction=True)

REFRESH = "1//refresh-token-marker-7f3a9c"
ACCESS = "ya29.access-token-marker-b81e2d"


def make() -> Mailbox:
    return Mailbox.objects.create(
        email="Box@Example.com", provider="oauth2", refresh_token=REFRESH, access_token=ACCESS
    )


def reload(mailbox: Mailbox) -> Mailbox:
    return Mailbox.objects.get(pk=mailbox.pk)


def test_tokens_never_reach_the_database_file_in_clear():
    mailbox = make()
    assert connection.vendor == "sqlite"
    raw = Path(connection.settings_dict["NAME"]).read_bytes()

    assert b"refresh-token-marker" not in raw
    assert b"access-token-marker" not in raw
    assert b"box@example.com" in raw  # the file is the one written to
    assert reload(mailbox).refresh_token == REFRESH


def test_email_is_stored_lower_case_and_unique_ignoring_case():
    make()
    from django.db import IntegrityError

    assert Mailbox.objects.get().email == "box@example.com"
    with pytest.raises(IntegrityError):
        Mailbox.objects.bulk_create([Mailbox(email="BOX@example.com", provider="oauth2")])


def test_rotating_secret_key_the_django_way_keeps_tokens_readable(settings):
    mailbox = make()
    old = settings.SECRET_KEY
    settings.SECRET_KEY = "a-brand-new-secret-key"
    settings.SECRET_KEY_FALLBACKS = [old]

    assert reload(mailbox).refresh_token == REFRESH
    reload(mailbox).save()  # re-encrypted under the new key

    settings.SECRET_KEY_FALLBACKS = []
    assert reload(mailbox).refresh_token == REFRESH


def test_encryption_keys_rotate_newest_first(settings):
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.XOAUTH2_MAIL = {"ENCRYPTION_KEYS": [old_key]}
    mailbox = make()

    settings.XOAUTH2_MAIL = {"ENCRYPTION_KEYS": [new_key, old_key]}
    assert reload(mailbox).access_token == ACCESS
    reload(mailbox).save()

    settings.XOAUTH2_MAIL = {"ENCRYPTION_KEYS": [new_key]}
    assert reload(mailbox).access_token == ACCESS


def test_a_wrong_key_gives_an_error_naming_the_settings(settings):
    mailbox = make()
    settings.SECRET_KEY = "someone-changed-the-key"

    with pytest.raises(EncryptionKeyError) as caught:
        reload(mailbox)

    assert "SECRET_KEY_FALLBACKS" in str(caught.value)
    assert "ENCRYPTION_KEYS" in str(caught.value)
    assert caught.value.__cause__ is None  # no cryptography traceback attached


def test_dumpdata_holds_only_ciphertext_and_loaddata_reads_it_back(tmp_path):
    mailbox = make()
    out = io.StringIO()
    call_command("dumpdata", "django_xoauth2_mail", stdout=out)
    dumped = out.getvalue()
    assert "marker" not in dumped
    (fields,) = [row["fields"] for row in json.loads(dumped)]
    assert fields["refresh_token"].startswith("fernet:")

    Mailbox.objects.all().delete()
    fixture = tmp_path / "mailboxes.json"
    fixture.write_text(dumped)
    call_command("loaddata", str(fixture), verbosity=0)
    restored = Mailbox.objects.get()
    assert (restored.pk, restored.refresh_token, restored.access_token) == (
        mailbox.pk,
        REFRESH,
        ACCESS,
    )


def test_repr_and_str_show_no_token():
    mailbox = make()
    for text in (repr(mailbox), str(mailbox)):
        assert "marker" not in text


def test_reencrypt_command_moves_every_mailbox_to_the_newest_key(settings):
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.XOAUTH2_MAIL = {"ENCRYPTION_KEYS": [old_key]}
    first = make()
    second = Mailbox.objects.create(email="two@example.com", provider="oauth2", refresh_token="rt2")

    settings.XOAUTH2_MAIL = {"ENCRYPTION_KEYS": [new_key, old_key]}
    out = io.StringIO()
    call_command("reencrypt_mailboxes", stdout=out)
    assert "2 mailbox(es)" in out.getvalue()

    settings.XOAUTH2_MAIL = {"ENCRYPTION_KEYS": [new_key]}  # the old key is gone
    assert reload(first).refresh_token == REFRESH
    assert reload(second).refresh_token == "rt2"


def test_reencrypt_command_reports_mailboxes_no_key_can_read(settings):
    from django.core.management.base import CommandError

    make()
    settings.SECRET_KEY = "a-key-that-never-encrypted-anything"
    with pytest.raises(CommandError, match="could not be decrypted"):
        call_command("reencrypt_mailboxes", stdout=io.StringIO())
