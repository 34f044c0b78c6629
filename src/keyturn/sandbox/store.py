"""The sandbox's durable state: one SQLite database in the state directory.

WAL with synchronous=FULL, and every API change is committed before its response is sent, so an
acknowledged change survives a SIGKILL. Methods are synchronous and thread-safe (one connection
behind a lock); the app calls them from a worker thread. Webhook delivery records are a log and
arrive in batches.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS principals (
    id TEXT PRIMARY KEY, org_id TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, org_id TEXT NOT NULL, kind TEXT NOT NULL,
    principal_id TEXT NOT NULL REFERENCES principals(id), name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS credentials (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uuid TEXT NOT NULL UNIQUE,
    credential_id TEXT NOT NULL UNIQUE,
    org_id TEXT NOT NULL,
    principal_id TEXT NOT NULL REFERENCES principals(id),
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    public_key TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    is_active INTEGER NOT NULL,
    date_created TEXT NOT NULL,
    origin TEXT NOT NULL,
    relying_party_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS credentials_principal ON credentials (principal_id);
CREATE TABLE IF NOT EXISTS codes (
    code TEXT PRIMARY KEY, org_id TEXT NOT NULL, principal_id TEXT NOT NULL,
    expiration TEXT NOT NULL, used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS webhooks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    org_id TEXT NOT NULL,
    url TEXT NOT NULL,
    events TEXT NOT NULL,
    description TEXT,
    status TEXT NOT NULL,
    secret TEXT NOT NULL,
    date_created TEXT NOT NULL,
    date_updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    webhook_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    date TEXT NOT NULL,
    data TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    delivery_attempt INTEGER NOT NULL,
    retry_of TEXT,
    timestamp_sent INTEGER NOT NULL,
    delivered INTEGER NOT NULL,
    recorded_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_webhook ON deliveries (webhook_id, seq);
CREATE TABLE IF NOT EXISTS fido2_credentials (
    uuid TEXT PRIMARY KEY REFERENCES credentials(uuid),
    sign_count INTEGER NOT NULL,
    aaguid TEXT NOT NULL,
    attestation_format TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS relying_parties (
    org_id TEXT PRIMARY KEY,
    origins TEXT NOT NULL,
    rp_ids TEXT NOT NULL,
    user_verification TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_id);
"""


@dataclass(frozen=True)
class Credential:
    uuid: str
    credential_id: str
    org_id: str
    principal_id: str
    kind: str
    name: str
    public_key: str
    algorithm: str
    is_active: bool
    date_created: str
    origin: str
    relying_party_id: str

    def to_api(self) -> dict[str, Any]:
        return {
            "credentialId": self.credential_id,
            "credentialUuid": self.uuid,
            "dateCreated": self.date_created,
            "isActive": self.is_active,
            "kind": self.kind,
            "name": self.name,
            "publicKey": self.public_key,
            "relyingPartyId": self.relying_party_id,
            "origin": self.origin,
        }


@dataclass(frozen=True)
class Fido2State:
    """What the sandbox keeps about a passkey beyond its public key (never a private key)."""

    uuid: str
    sign_count: int
    aaguid: str
    attestation_format: str


@dataclass(frozen=True)
class RelyingParties:
    """An organisation's allowed WebAuthn origins and rpIds (the first rpId is the default)."""

    org_id: str
    origins: list[str]
    rp_ids: list[str]
    user_verification: str  # "required" | "preferred"

    def to_api(self) -> dict[str, Any]:
        return {
            "orgId": self.org_id,
            "origins": list(self.origins),
            "rpIds": list(self.rp_ids),
            "userVerification": self.user_verification,
        }


@dataclass(frozen=True)
class Webhook:
    id: str
    org_id: str
    url: str
    events: list[str]
    description: str | None
    status: str
    secret: str
    date_created: str
    date_updated: str

    def to_api(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "url": self.url,
            "events": list(self.events),
            "status": self.status,
            "dateCreated": self.date_created,
            "dateUpdated": self.date_updated,
        }
        if self.description is not None:
            body["description"] = self.description
        return body

    def wants(self, kind: str) -> bool:
        return "*" in self.events or kind in self.events

    def __repr__(self) -> str:  # never show the secret
        return f"Webhook(id={self.id!r}, url={self.url!r}, status={self.status!r})"


@dataclass(frozen=True)
class Principal:
    id: str
    org_id: str
    kind: str  # "ServiceAccount" | "User" | "EndUser"
    name: str


@dataclass(frozen=True)
class TokenRecord:
    id: str
    org_id: str
    kind: str  # "Service" | "Pat" | "User" | "Delegated"
    principal_id: str
    name: str


@dataclass(frozen=True)
class DeliveryRecord:
    event_id: str
    webhook_id: str
    kind: str
    date: str
    data: dict[str, Any]
    status: str  # receiver's status code as a string, "" when no response
    error: str | None
    delivery_attempt: int
    retry_of: str | None
    timestamp_sent: int
    delivered: bool
    recorded_at: str

    def to_api(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.event_id,
            "webhookId": self.webhook_id,
            "kind": self.kind,
            "date": self.date,
            "data": self.data,
            "status": self.status,
            "timestampSent": self.timestamp_sent,
            "deliveryAttempt": self.delivery_attempt,
            "deliveryFailed": not self.delivered,
            "recordedAt": self.recorded_at,
        }
        if self.error is not None:
            body["error"] = self.error
        if self.retry_of is not None:
            body["retryOf"] = self.retry_of
        return body


def _credential(row: sqlite3.Row) -> Credential:
    return Credential(
        uuid=row["uuid"],
        credential_id=row["credential_id"],
        org_id=row["org_id"],
        principal_id=row["principal_id"],
        kind=row["kind"],
        name=row["name"],
        public_key=row["public_key"],
        algorithm=row["algorithm"],
        is_active=bool(row["is_active"]),
        date_created=row["date_created"],
        origin=row["origin"],
        relying_party_id=row["relying_party_id"],
    )


def _webhook(row: sqlite3.Row) -> Webhook:
    return Webhook(
        id=row["id"],
        org_id=row["org_id"],
        url=row["url"],
        events=json.loads(row["events"]),
        description=row["description"],
        status=row["status"],
        secret=row["secret"],
        date_created=row["date_created"],
        date_updated=row["date_updated"],
    )


def _delivery(row: sqlite3.Row) -> DeliveryRecord:
    return DeliveryRecord(
        event_id=row["event_id"],
        webhook_id=row["webhook_id"],
        kind=row["kind"],
        date=row["date"],
        data=json.loads(row["data"]),
        status=row["status"],
        error=row["error"],
        delivery_attempt=row["delivery_attempt"],
        retry_of=row["retry_of"],
        timestamp_sent=row["timestamp_sent"],
        delivered=bool(row["delivered"]),
        recorded_at=row["recorded_at"],
    )


class Conflict(Exception):
    """A uniqueness rule was violated (message is safe to show)."""


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._tx() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    # ------------------------------------------------------------------------ meta/bootstrap

    def get_meta(self, key: str) -> str | None:
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def bootstrap(
        self,
        *,
        meta: dict[str, str],
        principals: Sequence[Principal],
        tokens: Sequence[TokenRecord],
        credentials: Sequence[Credential],
        fido2: Sequence[Fido2State] = (),
        relying_parties: RelyingParties | None = None,
    ) -> None:
        """Write the whole initial organisation in one transaction."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO principals (id, org_id, kind, name) VALUES (?, ?, ?, ?)",
                [(p.id, p.org_id, p.kind, p.name) for p in principals],
            )
            db.executemany(
                "INSERT INTO tokens (id, org_id, kind, principal_id, name) VALUES (?, ?, ?, ?, ?)",
                [(t.id, t.org_id, t.kind, t.principal_id, t.name) for t in tokens],
            )
            for credential in credentials:
                self._insert_credential(db, credential)
            for state in fido2:
                self._insert_fido2(db, state)
            if relying_parties is not None:
                self._put_relying_parties(db, relying_parties)
            db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", sorted(meta.items()))

    def insert_principal(self, principal: Principal) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO principals (id, org_id, kind, name) VALUES (?, ?, ?, ?)",
                (principal.id, principal.org_id, principal.kind, principal.name),
            )

    def insert_token(self, token: TokenRecord) -> None:
        """Record an issued token (its id only: the token itself is never stored)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO tokens (id, org_id, kind, principal_id, name) VALUES (?, ?, ?, ?, ?)",
                (token.id, token.org_id, token.kind, token.principal_id, token.name),
            )

    def tokens(self) -> dict[str, TokenRecord]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM tokens").fetchall()
        return {
            r["id"]: TokenRecord(r["id"], r["org_id"], r["kind"], r["principal_id"], r["name"])
            for r in rows
        }

    def principals(self) -> dict[str, Principal]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM principals").fetchall()
        return {r["id"]: Principal(r["id"], r["org_id"], r["kind"], r["name"]) for r in rows}

    # ---------------------------------------------------------------------------- credentials

    @staticmethod
    def _insert_credential(db: sqlite3.Connection, c: Credential) -> None:
        try:
            db.execute(
                "INSERT INTO credentials (uuid, credential_id, org_id, principal_id, kind, name,"
                " public_key, algorithm, is_active, date_created, origin, relying_party_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    c.uuid,
                    c.credential_id,
                    c.org_id,
                    c.principal_id,
                    c.kind,
                    c.name,
                    c.public_key,
                    c.algorithm,
                    int(c.is_active),
                    c.date_created,
                    c.origin,
                    c.relying_party_id,
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(
                "a credential with this credId already exists; choose a new credId"
            ) from exc

    def insert_credential(self, credential: Credential) -> None:
        with self._tx() as db:
            self._insert_credential(db, credential)

    @staticmethod
    def _insert_fido2(db: sqlite3.Connection, state: Fido2State) -> None:
        db.execute(
            "INSERT INTO fido2_credentials (uuid, sign_count, aaguid, attestation_format)"
            " VALUES (?, ?, ?, ?)",
            (state.uuid, state.sign_count, state.aaguid, state.attestation_format),
        )

    def insert_fido2_credential(self, credential: Credential, state: Fido2State) -> None:
        """A passkey: its credential row and its counter state, in one transaction."""
        with self._tx() as db:
            self._insert_credential(db, credential)
            self._insert_fido2(db, state)

    def fido2_state(self, uuid: str) -> Fido2State | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM fido2_credentials WHERE uuid = ?", (uuid,)).fetchone()
        if row is None:
            return None
        return Fido2State(
            row["uuid"], int(row["sign_count"]), row["aaguid"], row["attestation_format"]
        )

    def advance_sign_count(self, uuid: str, expected: int, new: int) -> bool:
        """Compare-and-set of a passkey's counter (False when another assertion won the race)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE fido2_credentials SET sign_count = ? WHERE uuid = ? AND sign_count = ?",
                (new, uuid, expected),
            )
            return cur.rowcount == 1

    # ------------------------------------------------------------------------ relying parties

    @staticmethod
    def _put_relying_parties(db: sqlite3.Connection, rp: RelyingParties) -> None:
        db.execute(
            "INSERT INTO relying_parties (org_id, origins, rp_ids, user_verification)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (org_id) DO UPDATE SET origins = excluded.origins,"
            " rp_ids = excluded.rp_ids, user_verification = excluded.user_verification",
            (rp.org_id, json.dumps(rp.origins), json.dumps(rp.rp_ids), rp.user_verification),
        )

    def put_relying_parties(self, rp: RelyingParties) -> None:
        with self._tx() as db:
            self._put_relying_parties(db, rp)

    def relying_parties(self, org_id: str) -> RelyingParties | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM relying_parties WHERE org_id = ?", (org_id,)).fetchone()
        if row is None:
            return None
        return RelyingParties(
            org_id, json.loads(row["origins"]), json.loads(row["rp_ids"]), row["user_verification"]
        )

    def list_credentials(self, principal_id: str) -> list[Credential]:
        with self._read() as db:
            rows = db.execute(
                "SELECT * FROM credentials WHERE principal_id = ? ORDER BY seq", (principal_id,)
            ).fetchall()
        return [_credential(r) for r in rows]

    def credential_by_uuid(self, uuid: str) -> Credential | None:
        with self._read() as db:
            row = db.execute("SELECT * FROM credentials WHERE uuid = ?", (uuid,)).fetchone()
        return None if row is None else _credential(row)

    def credential_by_cred_id(self, credential_id: str) -> Credential | None:
        with self._read() as db:
            row = db.execute(
                "SELECT * FROM credentials WHERE credential_id = ?", (credential_id,)
            ).fetchone()
        return None if row is None else _credential(row)

    def set_active(self, uuid: str, active: bool) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE credentials SET is_active = ? WHERE uuid = ?", (int(active), uuid)
            )
            return cur.rowcount == 1

    def delete_credential(self, uuid: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM credentials WHERE uuid = ?", (uuid,))
            db.execute("DELETE FROM fido2_credentials WHERE uuid = ?", (uuid,))
            return cur.rowcount == 1

    def credential_counts(self) -> dict[str, dict[str, int]]:
        with self._read() as db:
            rows = db.execute(
                "SELECT principal_id, is_active, COUNT(*) AS n FROM credentials"
                " GROUP BY principal_id, is_active"
            ).fetchall()
        counts: dict[str, dict[str, int]] = {}
        for r in rows:
            entry = counts.setdefault(r["principal_id"], {"active": 0, "inactive": 0})
            entry["active" if r["is_active"] else "inactive"] += int(r["n"])
        return counts

    # ---------------------------------------------------------------------------------- codes

    @staticmethod
    def _code_key(code: str) -> str:
        # A code lets anyone add a credential while it lives: only its hash is stored.
        return "sha256:" + hashlib.sha256(code.strip().upper().encode("utf-8")).hexdigest()

    def insert_code(self, code: str, org_id: str, principal_id: str, expiration: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO codes (code, org_id, principal_id, expiration) VALUES (?, ?, ?, ?)",
                (self._code_key(code), org_id, principal_id, expiration),
            )

    def consume_code(self, code: str) -> tuple[str, str, str] | None:
        """(org_id, principal_id, expiration) of an unused code, marking it used."""
        key = self._code_key(code)
        with self._tx() as db:
            row = db.execute("SELECT * FROM codes WHERE code = ? AND used = 0", (key,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE codes SET used = 1 WHERE code = ?", (key,))
            return row["org_id"], row["principal_id"], row["expiration"]

    # ------------------------------------------------------------------------------- webhooks

    def insert_webhook(self, webhook: Webhook, limit: int) -> bool:
        """Insert unless the organisation already has `limit` webhooks (then False)."""
        with self._tx() as db:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM webhooks WHERE org_id = ?", (webhook.org_id,)
            ).fetchone()
            if count >= limit:
                return False
            db.execute(
                "INSERT INTO webhooks (id, org_id, url, events, description, status, secret,"
                " date_created, date_updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    webhook.id,
                    webhook.org_id,
                    webhook.url,
                    json.dumps(webhook.events),
                    webhook.description,
                    webhook.status,
                    webhook.secret,
                    webhook.date_created,
                    webhook.date_updated,
                ),
            )
            return True

    def update_webhook(self, webhook: Webhook) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE webhooks SET url = ?, events = ?, description = ?, status = ?,"
                " date_updated = ? WHERE id = ?",
                (
                    webhook.url,
                    json.dumps(webhook.events),
                    webhook.description,
                    webhook.status,
                    webhook.date_updated,
                    webhook.id,
                ),
            )

    def delete_webhook(self, webhook_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,)).rowcount == 1

    def webhooks(self) -> list[Webhook]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM webhooks ORDER BY seq").fetchall()
        return [_webhook(r) for r in rows]

    # ----------------------------------------------------------------------------- deliveries

    def append_deliveries(self, records: Sequence[DeliveryRecord]) -> None:
        if not records:
            return
        with self._tx() as db:
            db.executemany(
                "INSERT INTO deliveries (event_id, webhook_id, kind, date, data, status, error,"
                " delivery_attempt, retry_of, timestamp_sent, delivered, recorded_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.event_id,
                        r.webhook_id,
                        r.kind,
                        r.date,
                        json.dumps(r.data),
                        r.status,
                        r.error,
                        r.delivery_attempt,
                        r.retry_of,
                        r.timestamp_sent,
                        int(r.delivered),
                        r.recorded_at,
                    )
                    for r in records
                ],
            )

    def list_deliveries(
        self,
        webhook_id: str,
        *,
        limit: int,
        after_seq: int = 0,
        kind: str | None = None,
        failed: bool | None = None,
    ) -> list[tuple[int, DeliveryRecord]]:
        query = "SELECT * FROM deliveries WHERE webhook_id = ? AND seq > ?"
        params: list[Any] = [webhook_id, after_seq]
        if kind is not None:
            query += " AND kind = ?"
            params.append(kind)
        if failed is not None:
            query += " AND delivered = ?"
            params.append(0 if failed else 1)
        query += " ORDER BY seq LIMIT ?"
        params.append(limit)
        with self._read() as db:
            rows = db.execute(query, params).fetchall()
        return [(int(r["seq"]), _delivery(r)) for r in rows]

    def get_delivery(self, webhook_id: str, event_id: str) -> DeliveryRecord | None:
        with self._read() as db:
            row = db.execute(
                "SELECT * FROM deliveries WHERE webhook_id = ? AND event_id = ?",
                (webhook_id, event_id),
            ).fetchone()
        return None if row is None else _delivery(row)
