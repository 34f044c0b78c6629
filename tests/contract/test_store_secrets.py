"""Store contract: sealed secrets (put, get, replace, purge, master key ids).

Runs against every Store (the ``store`` fixture: memory, SQLite, PostgreSQL).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from keyturn.domain.errors import KeyturnError, NotFound
from keyturn.ports import Change, Store

#: The seed fixture's clock (tests/conftest.py).
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_secrets_round_trip_bytes_exactly(store: Store, seed) -> None:
    binary = bytes(range(256))
    key = seed.secret("sec-bin", ciphertext=binary, nonce=b"\x00" * 12, purpose="webhook-secret")
    seed.credential("svc", key_ref=None, token_ref=None)
    rotation = seed.rotation("svc")
    store.commit(Change(rotation.id, 1, secrets=[key]))
    got = store.get_secret("sec-bin")
    assert got == key
    assert got.ciphertext == binary and got.purpose == "webhook-secret"


def test_unknown_secret_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="no secret with id nope"):
        store.get_secret("nope")


def test_secret_ids_are_unique(store: Store, seed) -> None:
    cred = seed.credential("svc")
    rotation = seed.rotation("svc")
    clash = seed.secret(cred.key_ref)
    with pytest.raises(KeyturnError, match=str(cred.key_ref)):
        store.commit(Change(rotation.id, 1, secrets=[clash]))
    assert store.get_rotation(rotation.id).version == 1
    assert store.get_secret(str(cred.key_ref)) != clash


def test_all_secrets_and_master_key_ids(store: Store, seed) -> None:
    seed.credential("a")
    seed.credential("b", key_ref=None)
    rotation = seed.rotation("b")
    store.commit(Change(rotation.id, 1, secrets=[seed.secret("sec-z", master_key_id="mk-2")]))
    ids = [s.id for s in store.all_secrets()]
    assert ids == sorted(ids) and "sec-z" in ids and len(ids) == 2
    assert store.master_key_ids() == {"mk-1", "mk-2"}


def test_replace_secrets_reseals_in_one_transaction(store: Store, seed) -> None:
    a = store.get_secret(str(seed.credential("a").key_ref))
    b = store.get_secret(str(seed.credential("b").key_ref))
    new_a = replace(a, master_key_id="mk-2", nonce=b"n" * 12, ciphertext=b"resealed-a")
    new_b = replace(b, master_key_id="mk-2", nonce=b"m" * 12, ciphertext=b"resealed-b")
    store.replace_secrets([new_a, new_b])
    assert store.get_secret(a.id) == new_a
    assert store.get_secret(b.id).ciphertext == b"resealed-b"
    assert store.master_key_ids() == {"mk-2"}

    # One unknown id: nothing is replaced.
    ghost = replace(a, id="ghost")
    newer_a = replace(new_a, master_key_id="mk-3", ciphertext=b"x")
    with pytest.raises(NotFound):
        store.replace_secrets([newer_a, ghost])
    assert store.get_secret(a.id) == new_a


def test_purge_erases_ciphertext_once_due(store: Store, seed) -> None:
    old = seed.credential("svc")
    keep = seed.credential("other")
    rotation = seed.rotation("svc")
    store.commit(
        Change(
            rotation.id,
            1,
            purge_after={str(old.key_ref): T0 + timedelta(days=7)},
        )
    )
    assert store.purge_secrets(T0 + timedelta(days=7) - timedelta(seconds=1)) == []
    assert store.purge_secrets(T0 + timedelta(days=7)) == [old.key_ref]
    purged = store.get_secret(str(old.key_ref))
    assert purged.ciphertext == b""
    assert purged.purged_at == T0 + timedelta(days=7)
    # Already purged: not purged again.
    assert store.purge_secrets(T0 + timedelta(days=30)) == []
    assert store.get_secret(str(keep.key_ref)).ciphertext.startswith(b"sealed-")
    assert store.master_key_ids() == {"mk-1"}
    store.replace_secrets([replace(store.get_secret(str(keep.key_ref)), master_key_id="mk-9")])
    assert store.master_key_ids() == {"mk-9"}
