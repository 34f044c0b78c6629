"""The vault: master key text form, loading rules, AES-GCM sealing and every way opening fails."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keyturn.adapters.vault import (
    AesGcmVault,
    MasterKey,
    load_master_key,
    new_master_key,
    parse_master_key,
)
from keyturn.domain.errors import ConfigError, SecretError
from keyturn.domain.model import SealedSecret
from keyturn.testing.secret_scan import scan_bytes

PLAINTEXT = b"-----BEGIN PRIVATE KEY-----\nnot really a key but secret all the same\n"


def _key_bytes(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.removeprefix("ktmk1.") + "=")


def _secrets_of(key: MasterKey) -> dict[str, bytes | str]:
    return {"master key": key.key, "master key text": key.text()}


# --------------------------------------------------------------------------- master key text


def test_new_master_key_has_the_documented_format_and_id() -> None:
    text = new_master_key()
    assert re.fullmatch(r"ktmk1\.[A-Za-z0-9_-]{43}", text)
    raw = _key_bytes(text)
    assert len(raw) == 32
    key = parse_master_key(text, "test")
    assert key.key == raw
    assert key.key_id == hashlib.sha256(b"keyturn master key id\0" + raw).hexdigest()[:16]
    assert key.text() == text
    assert new_master_key() != text


def test_parse_tolerates_surrounding_whitespace() -> None:
    text = new_master_key()
    assert parse_master_key(f"  {text}\n", "test").text() == text


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   \n",
        "ktmk2." + "A" * 43,  # wrong version prefix
        "ktmk1." + "A" * 42,  # too short
        "ktmk1." + "A" * 44,  # too long
        "ktmk1." + "A" * 42 + "=",  # padding
        "ktmk1." + "A" * 42 + "+",  # not base64url
        "ktmk1." + "A" * 42 + "B",  # non-canonical: spare bits set
        "secret-value-without-prefix-0123456789abcdefghijklmno",
    ],
)
def test_parse_errors_name_the_source_and_never_echo_the_value(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_master_key(bad, "environment variable KEYTURN_MASTER_KEY")
    message = str(info.value)
    assert message.startswith("environment variable KEYTURN_MASTER_KEY ")
    assert "keyturn keys new-master" in message
    assert "\n" not in message
    if bad.strip():
        assert bad.strip() not in message
        assert bad.strip()[6:20] not in message


def test_master_key_repr_shows_the_id_only() -> None:
    key = MasterKey.generate()
    for shown in (repr(key), str(key), f"{key}", repr([key])):
        assert key.key_id in shown
        assert scan_bytes(shown, _secrets_of(key)) == []


# --------------------------------------------------------------------------- loading


def _write_key_file(path: Path, text: str, mode: int) -> Path:
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    env_text, file_text = new_master_key(), new_master_key()
    key_file = _write_key_file(tmp_path / "master.key", file_text, 0o600)
    assert load_master_key(env_text, key_file).text() == env_text
    assert load_master_key(None, key_file).text() == file_text
    assert load_master_key("", key_file).text() == file_text  # empty counts as unset


def test_file_with_group_or_other_bits_is_refused(tmp_path: Path) -> None:
    key_file = _write_key_file(tmp_path / "master.key", new_master_key(), 0o644)
    with pytest.raises(ConfigError) as info:
        load_master_key(None, key_file)
    assert str(info.value) == f"master key file {key_file} has mode 0644; run chmod 600 {key_file}"
    key_file.chmod(0o640)
    with pytest.raises(ConfigError, match="has mode 0640; run chmod 600"):
        load_master_key(None, key_file)
    key_file.chmod(0o400)
    assert load_master_key(None, key_file).key_id


def test_missing_file_neither_source_and_bad_content(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(ConfigError, match=f"master key file {missing} does not exist"):
        load_master_key(None, missing)
    with pytest.raises(ConfigError) as info:
        load_master_key(None, None, env_name="MY_KEY")
    assert "MY_KEY" in str(info.value)
    assert "keys.master_key_file" in str(info.value)
    assert "keyturn keys new-master" in str(info.value)
    directory = tmp_path / "dir.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_master_key(None, directory)
    garbage = _write_key_file(tmp_path / "garbage.key", "hunter2-hunter2-hunter2", 0o600)
    with pytest.raises(ConfigError) as info:
        load_master_key(None, garbage)
    assert str(info.value).startswith(f"master key file {garbage} does not hold")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_master_key("hunter2-hunter2-hunter2", garbage, env_name="MY_KEY")
    assert str(info.value).startswith("environment variable MY_KEY does not hold")
    assert "hunter2" not in str(info.value)


# --------------------------------------------------------------------------- seal / open


@pytest.fixture
def key1() -> MasterKey:
    return MasterKey.generate()


@pytest.fixture
def key2() -> MasterKey:
    return MasterKey.generate()


def test_seal_open_round_trip(key1: MasterKey) -> None:
    vault = AesGcmVault(key1)
    sealed = vault.seal("sec-1", "signing_key", PLAINTEXT)
    assert sealed.id == "sec-1"
    assert sealed.purpose == "signing_key"
    assert sealed.master_key_id == key1.key_id == vault.key_id
    assert len(sealed.nonce) == 12
    assert len(sealed.ciphertext) == len(PLAINTEXT) + 16  # plus the GCM tag
    assert sealed.created_at is not None and sealed.created_at.tzinfo is not None
    assert scan_bytes(sealed.ciphertext + sealed.nonce, {"plaintext": PLAINTEXT}) == []
    assert vault.open(sealed) == PLAINTEXT
    # A fresh vault with the same key (a restarted process) opens it too.
    assert AesGcmVault(parse_master_key(key1.text(), "test")).open(sealed) == PLAINTEXT


def test_every_seal_uses_a_fresh_nonce(key1: MasterKey) -> None:
    vault = AesGcmVault(key1)
    sealed = [vault.seal("same", "p", PLAINTEXT) for _ in range(50)]
    assert len({s.nonce for s in sealed}) == 50
    assert len({s.ciphertext for s in sealed}) == 50


def test_empty_plaintext_round_trips(key1: MasterKey) -> None:
    vault = AesGcmVault(key1)
    assert vault.open(vault.seal("empty", "p", b"")) == b""


def _auth_failure(vault: AesGcmVault, sealed: SealedSecret) -> str:
    with pytest.raises(SecretError) as info:
        vault.open(sealed)
    message = str(info.value)
    assert message == (
        f"secret {sealed.id} failed authentication: it was tampered with or moved to another row"
    )
    return message


def test_ciphertext_swapped_to_another_row_fails(key1: MasterKey) -> None:
    vault = AesGcmVault(key1)
    a = vault.seal("sec-a", "signing_key", b"secret A" * 4)
    b = vault.seal("sec-b", "signing_key", b"secret B" * 4)
    swapped = replace(b, nonce=a.nonce, ciphertext=a.ciphertext)  # row b now holds a's bytes
    _auth_failure(vault, swapped)
    _auth_failure(vault, replace(a, id="sec-b"))


def test_ciphertext_moved_to_another_purpose_fails(key1: MasterKey) -> None:
    vault = AesGcmVault(key1)
    sealed = vault.seal("sec-a", "signing_key", PLAINTEXT)
    _auth_failure(vault, replace(sealed, purpose="webhook_secret"))


def test_any_flipped_byte_fails(key1: MasterKey) -> None:
    vault = AesGcmVault(key1)
    sealed = vault.seal("sec-a", "signing_key", PLAINTEXT)
    for i in range(len(sealed.ciphertext)):  # body and tag
        flipped = bytearray(sealed.ciphertext)
        flipped[i] ^= 0x01
        _auth_failure(vault, replace(sealed, ciphertext=bytes(flipped)))
    for i in range(len(sealed.nonce)):
        nonce = bytearray(sealed.nonce)
        nonce[i] ^= 0x80
        _auth_failure(vault, replace(sealed, nonce=bytes(nonce)))
    _auth_failure(vault, replace(sealed, ciphertext=sealed.ciphertext[:-1]))
    _auth_failure(vault, replace(sealed, nonce=sealed.nonce[:4]))


def test_relabelled_master_key_id_fails_authentication(key1: MasterKey, key2: MasterKey) -> None:
    # The vault knows both keys, but the row claims the wrong one: the associated data binds it.
    vault = AesGcmVault(key2, previous=[key1])
    sealed = AesGcmVault(key1).seal("sec-a", "p", PLAINTEXT)
    _auth_failure(vault, replace(sealed, master_key_id=key2.key_id))


def test_unknown_master_key_says_which_key_and_how_to_fix(key1: MasterKey, key2: MasterKey) -> None:
    sealed = AesGcmVault(key1).seal("sec-a", "signing_key", PLAINTEXT)
    with pytest.raises(SecretError) as info:
        AesGcmVault(key2).open(sealed)
    assert str(info.value) == (
        f"secret sec-a was encrypted with master key {key1.key_id} but the configured master "
        f"key is {key2.key_id}; set KEYTURN_MASTER_KEY or keys.master_key_file to the key the "
        "database was encrypted with"
    )
    secrets = {**_secrets_of(key1), **{"k2": key2.key, "plaintext": PLAINTEXT}}
    assert scan_bytes(str(info.value), secrets) == []


def test_previous_keys_open_old_ciphertexts_and_new_ones_use_current(
    key1: MasterKey, key2: MasterKey
) -> None:
    old = AesGcmVault(key1).seal("sec-a", "p", PLAINTEXT)
    vault = AesGcmVault(key2, previous=[key1])
    assert vault.key_id == key2.key_id
    assert vault.key_ids == {key1.key_id, key2.key_id}
    assert vault.open(old) == PLAINTEXT
    assert vault.seal("sec-b", "p", PLAINTEXT).master_key_id == key2.key_id


def test_purged_secret_says_when(key1: MasterKey) -> None:
    vault = AesGcmVault(key1)
    sealed = vault.seal("sec-old", "signing_key", PLAINTEXT)
    purged_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with pytest.raises(SecretError) as info:
        vault.open(replace(sealed, ciphertext=b"", nonce=b"", purged_at=purged_at))
    assert str(info.value) == (
        "secret sec-old was purged on 2026-01-02 03:04:05 UTC after its retention period"
    )
    # Purged even if a store kept the bytes: the flag wins.
    with pytest.raises(SecretError, match="was purged on 2026-01-02"):
        vault.open(replace(sealed, purged_at=purged_at))
    with pytest.raises(SecretError, match=r"^secret sec-old was purged after its retention"):
        vault.open(replace(sealed, ciphertext=b""))


def test_rewrap_moves_a_secret_to_the_new_key(key1: MasterKey, key2: MasterKey) -> None:
    old_vault, new_vault = AesGcmVault(key1), AesGcmVault(key2)
    purge_after = datetime.now(UTC) + timedelta(days=30)
    sealed = replace(old_vault.seal("sec-a", "signing_key", PLAINTEXT), purge_after=purge_after)
    rewrapped = old_vault.rewrap(sealed, new_vault)
    assert (rewrapped.id, rewrapped.purpose) == (sealed.id, sealed.purpose)
    assert rewrapped.master_key_id == key2.key_id
    assert rewrapped.created_at == sealed.created_at
    assert rewrapped.purge_after == purge_after
    assert rewrapped.nonce != sealed.nonce
    assert new_vault.open(rewrapped) == PLAINTEXT
    with pytest.raises(SecretError, match="was encrypted with master key"):
        old_vault.open(rewrapped)


def test_rewrap_refuses_what_it_cannot_open(key1: MasterKey, key2: MasterKey) -> None:
    sealed = AesGcmVault(key1).seal("sec-a", "p", PLAINTEXT)
    tampered = replace(sealed, ciphertext=bytes(len(sealed.ciphertext)))
    with pytest.raises(SecretError, match="failed authentication"):
        AesGcmVault(key1).rewrap(tampered, AesGcmVault(key2))


def test_vault_repr_never_shows_key_material(key1: MasterKey, key2: MasterKey) -> None:
    vault = AesGcmVault(key2, previous=[key1])
    for shown in (repr(vault), str(vault), repr(vars(vault))):
        assert scan_bytes(shown, {**_secrets_of(key1), "k2": key2.key, "k2t": key2.text()}) == []
    assert key2.key_id in repr(vault) and key1.key_id in repr(vault)


def test_distinct_keys_have_distinct_ids() -> None:
    ids = {MasterKey(os.urandom(32)).key_id for _ in range(200)}
    assert len(ids) == 200
    with pytest.raises(ConfigError, match="must be 32 bytes"):
        MasterKey(b"short")
