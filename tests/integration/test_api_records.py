"""The HTTP API's records in the SQL store (SQLite and PostgreSQL): tokens stored as hashes,
revocation, and Idempotency-Key reservations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keyturn.adapters.store.sql import SqlStore
from keyturn.domain.errors import KeyturnError, NotFound
from keyturn.domain.model import IdempotencyRecord, Role
from keyturn.engine.access import authenticate, create_token, fingerprint, token_hash

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class _Clock:
    def now(self):  # type: ignore[no-untyped-def]
        return T0


@pytest.fixture
def sql(db_url: str):  # type: ignore[no-untyped-def]
    store = SqlStore(db_url)
    yield store
    store.close()


def test_a_token_is_stored_as_its_hash_and_revoked_tokens_stop_authenticating(sql) -> None:
    record, token = create_token(sql, _Clock(), name="oncall", role=Role.OPERATOR, actor="me")
    assert token.startswith("kt_") and len(token) > 40
    assert record.token_hash == token_hash(token) != token
    with sql.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT * FROM api_tokens").all()
    assert token not in repr(rows)
    assert authenticate(sql, token) == record
    assert authenticate(sql, token + "x") is None
    assert authenticate(sql, "not-a-token") is None
    with pytest.raises(KeyturnError, match="exists already"):
        create_token(sql, _Clock(), name="oncall", role=Role.ADMIN, actor="me")
    revoked = sql.revoke_token("oncall", T0 + timedelta(minutes=1))
    assert revoked.revoked_at == T0 + timedelta(minutes=1)
    assert sql.revoke_token("oncall", T0 + timedelta(hours=1)).revoked_at == revoked.revoked_at
    assert authenticate(sql, token) is None
    assert [t.name for t in sql.list_tokens()] == ["oncall"]
    with pytest.raises(NotFound, match="tokens list"):
        sql.revoke_token("nobody", T0)
    with pytest.raises(KeyturnError, match="not a token name"):
        create_token(sql, _Clock(), name="bad name", role=Role.VIEWER, actor="me")


def test_an_idempotency_key_is_reserved_once_then_replayed_or_released(sql) -> None:
    fp = fingerprint("POST", "/v1/rotations/r/pause", {"reason": "x"})
    assert fp == fingerprint("post", "/v1/rotations/r/pause", {"reason": "x"})
    assert fp != fingerprint("POST", "/v1/rotations/r/pause", {"reason": "y"})
    record = IdempotencyRecord("oncall", "k1", fp, T0)
    assert sql.reserve_idempotency(record) is None
    pending = sql.reserve_idempotency(record)
    assert pending is not None and pending.status_code is None and pending.fingerprint == fp
    sql.finish_idempotency("oncall", "k1", 202, {"outcome": "requested"})
    done = sql.reserve_idempotency(record)
    assert done is not None and (done.status_code, done.response) == (202, {"outcome": "requested"})
    # the same key of another token is its own
    assert sql.reserve_idempotency(IdempotencyRecord("other", "k1", fp, T0)) is None
    # a released reservation (the request failed) can be made again; a finished one cannot
    sql.release_idempotency("other", "k1")
    assert sql.reserve_idempotency(IdempotencyRecord("other", "k1", fp, T0)) is None
    sql.release_idempotency("oncall", "k1")
    assert sql.reserve_idempotency(record) is not None
