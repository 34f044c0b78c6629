"""The SQL implementation of the :class:`keyturn.ports.Store` port (SQLite and PostgreSQL).

Every state change is one guarded statement: ``UPDATE rotations ... WHERE id = :id AND version =
:expected RETURNING *`` for a commit, ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED
LIMIT n) RETURNING *`` for a claim. The database is the lock: on SQLite every transaction is
``BEGIN IMMEDIATE`` (one writer at a time, waiting up to the busy timeout instead of failing), on
PostgreSQL the claim skips rows another worker is claiming.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from functools import cache, cached_property
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Integer,
    Row,
    Table,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    not_,
    or_,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    StatementError,
)
from sqlalchemy.pool import NullPool

from keyturn.adapters.store.models import (
    actions_t,
    api_tokens_t,
    credentials_t,
    events_t,
    idempotency_keys_t,
    notifications_t,
    rotations_t,
    secrets_t,
    workers_t,
)
from keyturn.domain.errors import (
    AlreadyRotating,
    ConfigError,
    KeyturnError,
    NotFound,
    StaleVersion,
    StoreUnavailable,
)
from keyturn.domain.lifecycle import FINAL_STATES, State
from keyturn.domain.model import (
    ActionRecord,
    ActionStatus,
    ApiToken,
    Event,
    IdempotencyRecord,
    ManagedCredential,
    OperatorAction,
    OperatorRequest,
    Phase,
    Role,
    Rotation,
    SealedSecret,
    WorkerRecord,
)
from keyturn.domain.notify import Notice, notices
from keyturn.domain.reminders import OVERDUE_SUFFIX
from keyturn.ports import Change, FleetFacts, RotationQuery

#: SQLite waits this long for the write lock before giving up (milliseconds).
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Execution option: on SQLite, begin with a plain (deferred) BEGIN: a snapshot of the WAL that
#: takes no write lock, for a long read-only transaction (what /metrics reads).
DEFERRED_READ = "keyturn_deferred_read"

#: Rotation attributes a :class:`Change` may set (``request`` maps to the request_* columns).
UPDATABLE_FIELDS = frozenset(
    {
        "state",
        "reason",
        "data",
        "next_attempt_at",
        "lease_owner",
        "lease_expires_at",
        "attempts",
        "last_error",
        "halted_reason",
        "paused",
        "request",
        "rollback_from",
        "finished_at",
        "wait_key",
        "wait_for",
        "wait_since",
        "wait_deadline",
    }
)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def redact_url(url: str) -> str:
    """The URL without its password, for messages a human reads."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "<unparseable database URL>"
    # URL.set(password=None) keeps the password; NamedTuple._replace really drops it.
    cleaned = parsed._replace(password=None).difference_update_query(["password"])
    return cleaned.render_as_string(hide_password=False)


def normalize_url(url: str) -> str:
    """Accept ``postgres://`` and ``postgresql://`` as psycopg 3; refuse what keyturn cannot use."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"database URL {url.split('@')[-1]!r} is not a URL; use sqlite:///path/to/keyturn.db "
            "or postgresql+psycopg://user@host/db"
        ) from None
    driver = parsed.drivername
    if driver in ("postgres", "postgresql", "postgresql+psycopg"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif driver not in ("sqlite", "sqlite+pysqlite"):
        raise ConfigError(
            f"database URL {redact_url(url)} uses {driver!r}, which keyturn does not support; use "
            "sqlite:///path/to/keyturn.db or postgresql+psycopg://user@host/db"
        )
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, *, pooled: bool = True) -> Engine:
    """An engine configured the way keyturn needs it (also used by the Alembic environment).

    SQLite: WAL, a busy timeout, foreign keys on, and ``BEGIN IMMEDIATE`` for every transaction,
    so several worker processes on one file queue for the write lock instead of failing with
    "database is locked" or a busy snapshot. PostgreSQL: psycopg 3 with ``pool_pre_ping``.
    """
    url = normalize_url(url)
    parsed = make_url(url)
    # hide_parameters: a driver error's text never carries the statement's values (sealed
    # material, ids) into a log line or an exception message.
    options: dict[str, Any] = {"hide_parameters": True}
    if not pooled:
        options["poolclass"] = NullPool
    if parsed.get_backend_name() == "postgresql":
        return create_engine(url, pool_pre_ping=True, **options)

    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **options)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy (not the sqlite3 module) decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            if parsed.database not in (None, "", ":memory:"):
                cursor.execute("PRAGMA journal_mode = WAL")
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # a long read that needs one snapshot and no write lock (WAL) asks for a deferred one
        deferred = conn.get_execution_options().get(DEFERRED_READ, False)
        conn.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")

    return engine


# ------------------------------------------------------------------------------ row mapping


def _credential_from_row(row: Row[Any]) -> ManagedCredential:
    m = row._mapping
    return ManagedCredential(
        name=m["name"],
        kind=str(m["kind"]),
        provider=m["provider"],
        credential_id=m["credential_id"],
        credential_uuid=m["credential_uuid"],
        key_ref=m["key_ref"],
        algorithm=m["algorithm"],
        token_ref=m["token_ref"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
    )


def _credential_values(credential: ManagedCredential, now: datetime) -> dict[str, Any]:
    return {
        "name": credential.name,
        "kind": str(credential.kind),
        "provider": credential.provider,
        "credential_id": credential.credential_id,
        "credential_uuid": credential.credential_uuid,
        "key_ref": credential.key_ref,
        "algorithm": credential.algorithm,
        "token_ref": credential.token_ref,
        "created_at": credential.created_at or now,
        "updated_at": credential.updated_at or now,
    }


def _rotation_from_row(row: Row[Any]) -> Rotation:
    m = row._mapping
    request = None
    if m["request_action"] is not None:
        request = OperatorRequest(
            action=OperatorAction(m["request_action"]),
            actor=m["request_actor"],
            reason=m["request_reason"],
            at=m["request_at"],
        )
    return Rotation(
        id=m["id"],
        credential=m["credential"],
        kind=str(m["kind"]),
        state=State(m["state"]),
        version=m["version"],
        reason=m["reason"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        next_attempt_at=m["next_attempt_at"],
        lease_owner=m["lease_owner"],
        lease_expires_at=m["lease_expires_at"],
        lease_taken_at=m["lease_taken_at"],
        lease_taken_from=m["lease_taken_from"],
        attempts=m["attempts"],
        last_error=m["last_error"],
        halted_reason=m["halted_reason"],
        paused=bool(m["paused"]),
        request=request,
        rollback_from=State(m["rollback_from"]) if m["rollback_from"] is not None else None,
        finished_at=m["finished_at"],
        wait_key=m["wait_key"],
        wait_for=m["wait_for"],
        wait_since=m["wait_since"],
        wait_deadline=m["wait_deadline"],
        data=dict(m["data"] or {}),
        campaign=m["campaign"],
    )


def _request_values(request: OperatorRequest | None) -> dict[str, Any]:
    if request is None:
        return {
            "request_action": None,
            "request_actor": None,
            "request_reason": None,
            "request_at": None,
        }
    return {
        "request_action": OperatorAction(request.action).value,
        "request_actor": request.actor,
        "request_reason": request.reason,
        "request_at": request.at,
    }


def rotation_update_values(updates: Mapping[str, Any]) -> dict[str, Any]:
    """Column values for a :class:`Change`'s rotation updates; ValueError on an unknown field."""
    unknown = sorted(set(updates) - UPDATABLE_FIELDS)
    if unknown:
        raise ValueError(
            f"Change.updates has fields a commit cannot set: {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(UPDATABLE_FIELDS))}"
        )
    values: dict[str, Any] = {}
    for key, value in updates.items():
        if key == "request":
            values.update(_request_values(value))
        elif key in ("state", "rollback_from"):
            values[key] = State(value).value if value is not None else None
        elif key == "data":
            values[key] = dict(value or {})
        elif key == "paused":
            values[key] = bool(value)
        else:
            values[key] = value
    return values


def _rotation_values(rotation: Rotation) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": rotation.id,
        "credential": rotation.credential,
        "kind": str(rotation.kind),
        "state": State(rotation.state).value,
        "version": 1,
        "reason": rotation.reason,
        "created_at": rotation.created_at,
        "updated_at": rotation.updated_at,
        "next_attempt_at": rotation.next_attempt_at,
        "lease_owner": rotation.lease_owner,
        "lease_expires_at": rotation.lease_expires_at,
        "lease_taken_at": rotation.lease_taken_at,
        "lease_taken_from": rotation.lease_taken_from,
        "attempts": rotation.attempts,
        "last_error": rotation.last_error,
        "halted_reason": rotation.halted_reason,
        "paused": bool(rotation.paused),
        "rollback_from": (
            State(rotation.rollback_from).value if rotation.rollback_from is not None else None
        ),
        "finished_at": rotation.finished_at,
        "wait_key": rotation.wait_key,
        "wait_for": rotation.wait_for,
        "wait_since": rotation.wait_since,
        "wait_deadline": rotation.wait_deadline,
        "data": dict(rotation.data),
        "campaign": rotation.campaign,
    }
    values.update(_request_values(rotation.request))
    return values


def _worker_values(worker: WorkerRecord) -> dict[str, Any]:
    return {
        "owner": worker.owner,
        "host": worker.host,
        "pid": worker.pid,
        "started_at": worker.started_at,
        "heartbeat_at": worker.heartbeat_at,
        "stopped_at": worker.stopped_at,
        "concurrency": worker.concurrency,
        "heartbeat_seconds": float(worker.heartbeat_seconds),
        "lease_seconds": float(worker.lease_seconds),
    }


def _worker_from_row(row: Row[Any]) -> WorkerRecord:
    m = row._mapping
    return WorkerRecord(
        owner=m["owner"],
        host=m["host"],
        pid=int(m["pid"]),
        started_at=m["started_at"],
        heartbeat_at=m["heartbeat_at"],
        stopped_at=m["stopped_at"],
        concurrency=int(m["concurrency"]),
        heartbeat_seconds=float(m["heartbeat_seconds"]),
        lease_seconds=float(m["lease_seconds"]),
    )


def _token_from_row(row: Row[Any]) -> ApiToken:
    return ApiToken(
        name=row.name,
        role=Role(row.role),
        token_hash=row.token_hash,
        created_at=row.created_at,
        created_by=row.created_by,
        revoked_at=row.revoked_at,
    )


def _event_values(ev: Event) -> dict[str, Any]:
    return {
        "rotation_id": ev.rotation_id,
        "at": ev.at,
        "kind": ev.kind,
        "actor": ev.actor,
        "from_state": ev.from_state,
        "to_state": ev.to_state,
        "trigger": ev.trigger,
        "reason": ev.reason,
        "detail": dict(ev.detail),
    }


def _event_from_row(row: Row[Any]) -> Event:
    m = row._mapping
    return Event(
        id=m["id"],
        rotation_id=m["rotation_id"],
        at=m["at"],
        kind=m["kind"],
        actor=m["actor"],
        from_state=m["from_state"],
        to_state=m["to_state"],
        trigger=m["trigger"],
        reason=m["reason"],
        detail=dict(m["detail"] or {}),
    )


def notice_values(notice: Notice, now: datetime) -> dict[str, Any]:
    """The outbox row of a notification (keyturn.domain.notify)."""
    return {
        "rotation_id": notice.rotation_id,
        "kind": notice.kind.value,
        "key": notice.key,
        "at": notice.at,
        "created_at": now,
        "payload": notice.payload(),
        "fanned_out": False,
    }


def insert_notices(
    conn: Connection, events: Sequence[Event], rotation: Rotation, now: datetime
) -> None:
    """The outbox rows of `events` (committed with `rotation`), in the caller's transaction."""
    found = notices(events, rotation)
    if found:
        conn.execute(insert(notifications_t), [notice_values(n, now) for n in found])


def _action_from_row(row: Row[Any]) -> ActionRecord:
    m = row._mapping
    return ActionRecord(
        rotation_id=m["rotation_id"],
        phase=Phase(m["phase"]),
        name=m["name"],
        idempotency_key=m["idempotency_key"],
        status=ActionStatus(m["status"]),
        intent_at=m["intent_at"],
        outcome_at=m["outcome_at"],
        attempts=m["attempts"],
        detail=dict(m["detail"] or {}),
        error=m["error"],
    )


def _secret_values(secret: SealedSecret, now: datetime) -> dict[str, Any]:
    return {
        "id": secret.id,
        "purpose": secret.purpose,
        "master_key_id": secret.master_key_id,
        "nonce": bytes(secret.nonce),
        "ciphertext": bytes(secret.ciphertext),
        "created_at": secret.created_at or now,
        "purge_after": secret.purge_after,
        "purged_at": secret.purged_at,
    }


def _secret_from_row(row: Row[Any]) -> SealedSecret:
    m = row._mapping
    return SealedSecret(
        id=m["id"],
        purpose=m["purpose"],
        master_key_id=m["master_key_id"],
        nonce=bytes(m["nonce"]),
        # A purged secret has no ciphertext left; the port's type is bytes, so it is empty.
        ciphertext=bytes(m["ciphertext"]) if m["ciphertext"] is not None else b"",
        created_at=m["created_at"],
        purge_after=m["purge_after"],
        purged_at=m["purged_at"],
    )


def credential_not_found(name: str) -> NotFound:
    return NotFound(f"no managed credential named {name}; see `keyturn credentials list`")


def rotation_not_found(rotation_id: str) -> NotFound:
    return NotFound(f"no rotation with id {rotation_id}; see `keyturn rotations list`")


def secret_not_found(secret_id: str) -> NotFound:
    return NotFound(f"no secret with id {secret_id}")


def _claim_order() -> list[Any]:
    """Claim order: the longest-waiting first (never-scheduled last), then the oldest rotation.

    ``ASC NULLS LAST`` is PostgreSQL's native index order, so the claim walks the partial
    ``ix_rotations_due`` index and stops after `limit` rows instead of sorting the queue.
    """
    return [
        rotations_t.c.next_attempt_at.asc().nulls_last(),
        rotations_t.c.created_at.asc(),
        rotations_t.c.id.asc(),
    ]


def claim_sort_key(rotation: Rotation) -> tuple[int, datetime, datetime, str]:
    """The order claim() hands out rotations in (also used by the in-memory store)."""
    epoch = datetime.min.replace(tzinfo=UTC)
    nxt = rotation.next_attempt_at
    return (1 if nxt is None else 0, nxt or epoch, rotation.created_at, rotation.id)


# ------------------------------------------------------------------------ the list's query

#: wait_key prefix of a policy's approval gate (keyturn.engine.operator.APPROVAL_KEY).
APPROVAL_PREFIX = "gate.approval"
#: How much wider than "past half its deadline" the store's wait condition is (float
#: arithmetic on SQLite's julianday); the engine's definition decides on what it returns.
WAIT_MARGIN_SECONDS = 1.0


def _status_chain() -> list[tuple[str, ColumnElement[bool]]]:
    """keyturn.engine.attention.status_key as SQL, in its order: a row has the first status
    whose condition holds (finished_at IS NULL is the store's own mark of an unfinished
    rotation, set with the final state; it lets the unfinished rows' index serve)."""
    r = rotations_t.c
    final = [s.value for s in FINAL_STATES]
    return [
        ("requested", r.request_action.is_not(None)),
        ("paused", r.paused.is_(True)),
        ("halted", r.halted_reason.is_not(None)),
        ("done", r.state.in_(final)),
        (
            "awaiting_approval",
            and_(r.wait_key.is_not(None), r.wait_key.like(f"{APPROVAL_PREFIX}%")),
        ),
        ("waiting", r.wait_for.is_not(None)),
        ("running", r.lease_owner.is_not(None)),
        ("retrying", r.attempts > 0),
        ("due", true()),
    ]


def status_condition(status: str) -> ColumnElement[bool]:
    """Rows whose status_key is `status` (exactly; ValueError for an unknown status)."""
    chain = _status_chain()
    names = [name for name, _ in chain]
    if status not in names:
        raise ValueError(f"unknown status {status!r}; use one of {', '.join(names)}")
    r = rotations_t.c
    conds: list[ColumnElement[bool]] = []
    for name, cond in chain:
        if name == status:
            conds.append(cond)
            break
        conds.append(not_(cond))
    if status != "done":
        conds.append(r.finished_at.is_(None))
    return and_(*conds)


def _wait_half_passed(postgres: bool, now: datetime) -> ColumnElement[bool]:
    """A wait past half its deadline at `now`, or within WAIT_MARGIN_SECONDS of it."""
    r = rotations_t.c
    if postgres:
        return text(
            "rotations.wait_since + (rotations.wait_deadline - rotations.wait_since) / 2 "
            "<= CAST(:wait_now AS TIMESTAMP WITH TIME ZONE) + make_interval(secs => :wait_margin)"
        ).bindparams(
            bindparam("wait_now", now, type_=r.wait_since.type),
            bindparam("wait_margin", WAIT_MARGIN_SECONDS),
        )  # type: ignore[return-value]
    naive = now.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")
    return text(
        "julianday(rotations.wait_since) + (julianday(rotations.wait_deadline) - "
        "julianday(rotations.wait_since)) / 2 <= julianday(:wait_now) + :wait_margin / 86400.0"
    ).bindparams(bindparam("wait_now", naive), bindparam("wait_margin", WAIT_MARGIN_SECONDS))  # type: ignore[return-value]


def attention_condition(
    postgres: bool, now: datetime, request_stale_before: datetime | None
) -> ColumnElement[bool]:
    """Rows that may need attention at `now`: never narrower than
    keyturn.engine.attention.attention (a contract test checks it on rows of every kind)."""
    r = rotations_t.c
    stale = request_stale_before if request_stale_before is not None else now
    return and_(
        r.finished_at.is_(None),
        r.state.not_in([s.value for s in FINAL_STATES]),
        or_(
            r.halted_reason.is_not(None),
            and_(r.wait_key.is_not(None), r.wait_key.like(f"{APPROVAL_PREFIX}%")),
            and_(r.wait_key.is_not(None), r.wait_key.like(f"%{OVERDUE_SUFFIX}")),
            and_(r.lease_owner.is_not(None), r.lease_expires_at < now),
            and_(r.request_action.is_not(None), r.request_at < stale),
            and_(
                r.wait_since.is_not(None),
                r.wait_deadline.is_not(None),
                _wait_half_passed(postgres, now),
            ),
            r.attempts > 0,
        ),
    )


def rotation_select(query: RotationQuery, *, postgres: bool) -> Any:
    """The SELECT of find_rotations (also what the API bench EXPLAINs)."""
    r = rotations_t.c
    stmt = select(rotations_t)
    if query.state is not None:
        state = State(query.state)
        stmt = stmt.where(r.state == state.value)
        if state not in FINAL_STATES:
            stmt = stmt.where(r.finished_at.is_(None))
    if query.credential is not None:
        stmt = stmt.where(r.credential == query.credential)
    if query.kind is not None:
        stmt = stmt.where(r.kind == query.kind)
    if query.holder is not None:
        stmt = stmt.where(r.lease_owner == query.holder)
    if query.status is not None:
        stmt = stmt.where(status_condition(query.status))
    if query.attention_at is not None:
        stmt = stmt.where(
            attention_condition(postgres, query.attention_at, query.request_stale_before)
        )
    if query.updated_since is not None:
        stmt = stmt.where(r.updated_at >= query.updated_since)
    if query.before is not None:
        at, rid = query.before
        stmt = stmt.where(tuple_(r.created_at, r.id) < tuple_(
            bindparam("before_at", at, type_=r.created_at.type), bindparam("before_id", rid)
        ))  # fmt: skip
    stmt = stmt.order_by(r.created_at.desc(), r.id.desc())
    if query.limit is not None:
        stmt = stmt.limit(query.limit)
    return stmt


def rotation_query_sql(now: datetime | None = None) -> dict[str, str]:
    """The list queries the API sends for a first page, as PostgreSQL SQL with literal values
    (for EXPLAIN in the bench)."""
    from sqlalchemy.dialects import postgresql

    at = now or datetime.now(UTC)
    from datetime import timedelta

    queries = {
        "list first page": RotationQuery(limit=51),
        "attention first page": RotationQuery(
            attention_at=at, request_stale_before=at - timedelta(minutes=5), limit=51
        ),
        "status=halted": RotationQuery(status="halted", limit=51),
        "list second page": RotationQuery(before=(at, "rot_~"), limit=51),
    }
    out = {}
    for label, q in queries.items():
        compiled = rotation_select(q, postgres=True).compile(
            dialect=postgresql.dialect(),  # type: ignore[no-untyped-call]
            compile_kwargs={"literal_binds": True},
        )
        out[label] = str(compiled)
    return out


# ------------------------------------------------------------------------------------- store


class SqlStore:
    """The Store port on SQLAlchemy Core; ``SqlStore("sqlite:///keyturn.db")`` or
    ``SqlStore("postgresql+psycopg://user@host/db")``. It does not migrate: see
    :func:`keyturn.adapters.store.migrate.open_store`."""

    def __init__(self, url: str, *, clock: Callable[[], datetime] | None = None) -> None:
        self._url = normalize_url(url)
        self._engine = make_engine(self._url)
        self._now = clock or _utcnow
        self._postgres = self._engine.dialect.name == "postgresql"
        self._reader = self._engine.execution_options(isolation_level="AUTOCOMMIT")

    def __repr__(self) -> str:
        return f"SqlStore({redact_url(self._url)!r})"

    @property
    def url(self) -> str:
        """The database URL without its password."""
        return redact_url(self._url)

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        """Release pooled connections."""
        self._engine.dispose()

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _upsert(self, table: Table) -> Any:
        """The dialect's INSERT (with ``on_conflict_do_update``), imported when first used."""
        if self._postgres:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """One transaction; the database errors a caller can act on, translated."""
        with self._translated(), self._engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """For reads: on PostgreSQL in autocommit (one round trip per statement, no BEGIN and
        COMMIT); on SQLite the usual transaction."""
        if not self._postgres:
            with self._tx() as conn:
                yield conn
            return
        with self._translated(), self._reader.connect() as conn:
            yield conn

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            raise _unavailable(self._url, exc) from None
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise _unavailable(self._url, exc) from None
            raise
        except StatementError as exc:
            # A value the store refuses before it reaches the database (a naive datetime):
            # the same ValueError the in-memory store raises, without the SQL around it.
            if not isinstance(exc, DBAPIError) and isinstance(exc.orig, ValueError):
                raise ValueError(str(exc.orig)) from None
            raise

    # ------------------------------------------------------------------ managed credentials

    def add_credential(
        self, credential: ManagedCredential, secrets: Sequence[SealedSecret]
    ) -> None:
        now = self._now()
        try:
            with self._tx() as conn:
                exists = conn.execute(
                    select(credentials_t.c.name).where(credentials_t.c.name == credential.name)
                ).first()
                if exists is not None:
                    raise KeyturnError(
                        f"a managed credential named {credential.name} already exists; "
                        "choose another name or see `keyturn credentials list`"
                    )
                self._insert_secrets(conn, secrets, now)
                conn.execute(insert(credentials_t).values(**_credential_values(credential, now)))
        except IntegrityError as exc:
            raise KeyturnError(
                f"cannot add managed credential {credential.name}: "
                f"{_integrity_reason(exc)}; check the name and its secret ids"
            ) from None

    def get_credential(self, name: str) -> ManagedCredential:
        with self._read() as conn:
            row = conn.execute(_CREDENTIAL_BY_NAME, {"name": name}).first()
        if row is None:
            raise credential_not_found(name)
        return _credential_from_row(row)

    def get_credentials(self, names: Sequence[str]) -> dict[str, ManagedCredential]:
        if not names:
            return {}
        with self._read() as conn:
            rows = conn.execute(_CREDENTIALS_BY_NAME, {"names": list(names)}).all()
        return {c.name: c for c in map(_credential_from_row, rows)}

    def list_credentials(self) -> list[ManagedCredential]:
        with self._read() as conn:
            rows = conn.execute(select(credentials_t).order_by(credentials_t.c.name)).all()
        return [_credential_from_row(r) for r in rows]

    def page_credentials(self, *, limit: int, after: str | None = None) -> list[ManagedCredential]:
        """:class:`keyturn.ports.CredentialPager`."""
        stmt = select(credentials_t)
        if after is not None:
            stmt = stmt.where(credentials_t.c.name > after)
        stmt = stmt.order_by(credentials_t.c.name).limit(limit)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        return [_credential_from_row(r) for r in rows]

    # ---------------------------------------------------------------------------- rotations

    def create_rotation(self, rotation: Rotation, event: Event) -> Rotation:
        try:
            with self._tx() as conn:
                known = conn.execute(
                    select(credentials_t.c.name).where(credentials_t.c.name == rotation.credential)
                ).first()
                if known is None:
                    raise credential_not_found(rotation.credential)
                row = conn.execute(
                    insert(rotations_t).values(**_rotation_values(rotation)).returning(rotations_t)
                ).one()
                conn.execute(insert(events_t).values(**_event_values(event)))
                return _rotation_from_row(row)
        except IntegrityError:
            pass
        # The insert was refused (the transaction is rolled back): say why, from a fresh one.
        with self._tx() as conn:
            existing = conn.execute(
                select(rotations_t.c.id).where(
                    rotations_t.c.credential == rotation.credential,
                    rotations_t.c.finished_at.is_(None),
                )
            ).scalar()
            duplicate = conn.execute(
                select(rotations_t.c.id).where(rotations_t.c.id == rotation.id)
            ).scalar()
        if existing is not None:
            raise AlreadyRotating(rotation.credential, existing)
        if duplicate is not None:
            raise KeyturnError(f"a rotation with id {rotation.id} already exists; use a new id")
        raise AlreadyRotating(rotation.credential)

    def get_rotation(self, rotation_id: str) -> Rotation:
        with self._read() as conn:
            row = conn.execute(select(rotations_t).where(rotations_t.c.id == rotation_id)).first()
        if row is None:
            raise rotation_not_found(rotation_id)
        return _rotation_from_row(row)

    def list_rotations(
        self, *, state: State | None = None, credential: str | None = None
    ) -> list[Rotation]:
        stmt = select(rotations_t)
        if state is not None:
            stmt = stmt.where(rotations_t.c.state == State(state).value)
        if credential is not None:
            stmt = stmt.where(rotations_t.c.credential == credential)
        stmt = stmt.order_by(rotations_t.c.created_at.desc(), rotations_t.c.id.desc())
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        return [_rotation_from_row(r) for r in rows]

    def find_rotations(self, query: RotationQuery) -> list[Rotation]:
        stmt = rotation_select(query, postgres=self._postgres)
        with self._read() as conn:
            rows = conn.execute(stmt).all()
        return [_rotation_from_row(r) for r in rows]

    def has_pending_work(self, horizon: datetime) -> bool:
        r = rotations_t.c
        stmt = (
            select(r.id)
            .where(
                r.finished_at.is_(None),
                r.paused.is_(False),
                r.halted_reason.is_(None),
                or_(r.next_attempt_at.is_(None), r.next_attempt_at <= horizon),
            )
            .limit(1)
        )
        with self._read() as conn:
            return conn.execute(stmt).first() is not None

    def rotation_ids(self, prefix: str, *, limit: int = 2) -> list[str]:
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = (
            select(rotations_t.c.id)
            .where(rotations_t.c.id.like(f"{escaped}%", escape="\\"))
            .order_by(rotations_t.c.id)
            .limit(limit)
        )
        with self._read() as conn:
            return [str(row[0]) for row in conn.execute(stmt)]

    def latest_rotation(self, credential: str) -> Rotation | None:
        stmt = (
            select(rotations_t)
            .where(rotations_t.c.credential == credential)
            .order_by(rotations_t.c.created_at.desc(), rotations_t.c.id.desc())
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(stmt).first()
        return _rotation_from_row(row) if row is not None else None

    def events(self, rotation_id: str) -> list[Event]:
        with self._read() as conn:
            rows = conn.execute(
                select(events_t)
                .where(events_t.c.rotation_id == rotation_id)
                .order_by(events_t.c.id.asc())
            ).all()
            if not rows:
                self._require_rotation(conn, rotation_id)
        return [_event_from_row(r) for r in rows]

    def actions(self, rotation_id: str) -> list[ActionRecord]:
        with self._read() as conn:
            rows = conn.execute(
                select(actions_t)
                .where(actions_t.c.rotation_id == rotation_id)
                .order_by(actions_t.c.seq.asc())
            ).all()
            if not rows:
                self._require_rotation(conn, rotation_id)
        return [_action_from_row(r) for r in rows]

    def actions_of(self, rotation_ids: Sequence[str]) -> dict[str, list[ActionRecord]]:
        out: dict[str, list[ActionRecord]] = {r: [] for r in rotation_ids}
        if not out:
            return out
        with self._read() as conn:
            rows = conn.execute(_ACTIONS_OF, {"ids": list(out)}).all()
        for row in rows:
            out[row._mapping["rotation_id"]].append(_action_from_row(row))
        return out

    def claim(
        self, *, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[Rotation]:
        if limit <= 0:
            return []
        stmt = _claim_statement()
        params = {"c_owner": owner, "c_now": now, "c_until": lease_until, "c_limit": limit}
        with self._tx() as conn:
            rows = conn.execute(stmt, params).all()
        return sorted((_rotation_from_row(row) for row in rows), key=claim_sort_key)

    def commit(self, change: Change) -> Rotation:
        values = rotation_update_values(change.updates)
        now = self._now()
        try:
            with self._tx() as conn:
                return self._commit(conn, change, values, now)
        except IntegrityError as exc:
            raise KeyturnError(
                f"commit to rotation {change.rotation_id} refused by the database: "
                f"{_integrity_reason(exc)}"
            ) from None

    def commit_many(self, changes: Sequence[Change]) -> list[Rotation | KeyturnError]:
        """One transaction for the whole batch. A stale change is detected by its guarded
        UPDATE before it writes anything, so it is simply reported; any other failure (rare: an
        integrity error) aborts the batch, which is then committed change by change."""
        if len(changes) == 1:
            return [self._commit_or_error(changes[0])]
        now = self._now()
        if self._postgres:
            from keyturn.adapters.store import pg_batch  # PostgreSQL only: its dialect is costly

            try:
                return self._commit_set_based(changes, now)
            except StoreUnavailable:
                raise
            except (pg_batch.Fallback, IntegrityError, KeyturnError, ValueError):
                pass  # written change by change below, which names the precise error
        results: list[Rotation | KeyturnError] = []
        try:
            with self._tx() as conn:
                for change in changes:
                    try:
                        results.append(
                            self._commit(conn, change, rotation_update_values(change.updates), now)
                        )
                    except StaleVersion as exc:
                        results.append(exc)
        except StoreUnavailable:
            raise
        except (IntegrityError, KeyturnError, ValueError):
            return [self._commit_or_error(c) for c in changes]
        return results

    def _commit_set_based(
        self, changes: Sequence[Change], now: datetime
    ) -> list[Rotation | KeyturnError]:
        """PostgreSQL: the whole batch in a few set-based statements (see pg_batch)."""
        from keyturn.adapters.store import pg_batch

        values = [rotation_update_values(c.updates) for c in changes]
        results: list[Rotation | KeyturnError | None] = [None] * len(changes)
        with self._tx() as conn:
            for members in pg_batch.rounds(changes):
                batch = [changes[i] for i in members]
                written = pg_batch.update_rotations(
                    conn,
                    rotations_t,
                    batch,
                    [values[i] for i in members],
                    now,
                    _rotation_from_row,
                    rotation_not_found,
                )
                for i, result in zip(members, written, strict=True):
                    results[i] = result
                done = [c for c, r in zip(batch, written, strict=True) if isinstance(r, Rotation)]
                self._write_rows_set_based(conn, done, now)
                for change, result in zip(batch, written, strict=True):
                    if isinstance(result, Rotation) and change.events:
                        insert_notices(conn, change.events, result, now)
        return [r for r in results if r is not None]

    def _write_rows_set_based(self, conn: Connection, done: list[Change], now: datetime) -> None:
        """The rows that go with the changes whose compare-and-set succeeded."""
        from keyturn.adapters.store import pg_batch

        secrets = [s for c in done for s in c.secrets]
        if secrets:
            ids = [s.id for s in secrets]
            if (
                len(set(ids)) != len(ids)
                or conn.execute(
                    select(secrets_t.c.id).where(secrets_t.c.id.in_(ids)).limit(1)
                ).first()
            ):
                raise pg_batch.Fallback("secret id taken")
            conn.execute(insert(secrets_t), [_secret_values(s, now) for s in secrets])
        pg_batch.replace_credentials(conn, done, now)
        pg_batch.set_purge_after(conn, done)
        pg_batch.insert_events(conn, done)
        pg_batch.upsert_actions(conn, done)

    def _commit_or_error(self, change: Change) -> Rotation | KeyturnError:
        try:
            return self.commit(change)
        except StoreUnavailable:
            raise
        except KeyturnError as exc:
            return exc

    def _commit(
        self, conn: Connection, change: Change, values: dict[str, Any], now: datetime
    ) -> Rotation:
        row = conn.execute(
            _compare_and_set(tuple(sorted(values))),
            {
                **{f"u_{k}": v for k, v in values.items()},
                "u_id": change.rotation_id,
                "u_expected": change.expected_version,
                "u_now": now,
            },
        ).first()
        if row is None:
            self._require_rotation(conn, change.rotation_id)
            raise StaleVersion(change.rotation_id, change.expected_version)
        self._insert_secrets(conn, change.secrets, now)
        if change.credential is not None:
            self._replace_credential(conn, change.credential, now)
        for secret_id, when in change.purge_after.items():
            self._set_purge_after(conn, secret_id, when)
        rotation = _rotation_from_row(row)
        if change.events:
            conn.execute(insert(events_t), [_event_values(ev) for ev in change.events])
            insert_notices(conn, change.events, rotation, now)
        for earlier in change.earlier_actions:
            self._upsert_action(conn, earlier)
        if change.action is not None:
            self._upsert_action(conn, change.action)
        return rotation

    def request(
        self,
        rotation_id: str,
        request: OperatorRequest,
        event: Event,
        *,
        expected_version: int | None = None,
    ) -> Rotation:
        now = self._now()
        r = rotations_t.c
        guard = [r.id == rotation_id]
        if expected_version is not None:
            guard += [r.version == expected_version, r.request_action.is_(None)]
        with self._tx() as conn:
            row = conn.execute(
                update(rotations_t)
                .where(*guard)
                .values(**_request_values(request), next_attempt_at=request.at, updated_at=now)
                .returning(rotations_t)
            ).first()
            if row is None:
                self._require_rotation(conn, rotation_id)
                raise StaleVersion(rotation_id, expected_version or 0)
            conn.execute(insert(events_t).values(**_event_values(event)))
            rotation = _rotation_from_row(row)
            insert_notices(conn, [event], rotation, now)
        return rotation

    def append_event(self, event: Event) -> None:
        with self._tx() as conn:
            self._require_rotation(conn, event.rotation_id)
            conn.execute(insert(events_t).values(**_event_values(event)))

    def campaign_rotations(self, campaign: str | None = None) -> list[Rotation]:
        r = rotations_t.c
        where = r.campaign.is_not(None) if campaign is None else r.campaign == campaign
        with self._read() as conn:
            rows = conn.execute(
                select(rotations_t).where(where).order_by(r.created_at.asc(), r.id.asc())
            ).all()
        return [_rotation_from_row(row) for row in rows]

    def add_evidence(self, event: Event) -> bool:
        event = replace(event, kind="evidence")
        e, r = events_t.c, rotations_t.c
        with self._tx() as conn:
            self._require_rotation(conn, event.rotation_id)
            there = conn.execute(
                select(e.id)
                .where(
                    e.rotation_id == event.rotation_id,
                    e.kind == "evidence",
                    e.trigger == event.trigger,
                )
                .limit(1)
            ).first()
            if there is not None:
                return False
            conn.execute(insert(events_t).values(**_event_values(event)))
            conn.execute(
                update(rotations_t)
                .where(
                    r.id == event.rotation_id,
                    r.finished_at.is_(None),
                    r.lease_owner.is_(None),
                    or_(r.next_attempt_at.is_(None), r.next_attempt_at > event.at),
                )
                .values(next_attempt_at=event.at)
            )
        return True

    def wake_waiting(self, at: datetime, rotation_id: str | None = None) -> int:
        r = rotations_t.c
        stmt = update(rotations_t).where(
            r.finished_at.is_(None),
            r.wait_key.is_not(None),
            r.lease_owner.is_(None),
            or_(r.next_attempt_at.is_(None), r.next_attempt_at > at),
        )
        if rotation_id is not None:
            stmt = stmt.where(r.id == rotation_id)
        with self._tx() as conn:
            result = conn.execute(stmt.values(next_attempt_at=at))
        return int(result.rowcount or 0)

    def evidence(self, rotation_id: str) -> dict[str, Event]:
        e = events_t.c
        with self._read() as conn:
            rows = conn.execute(
                select(events_t)
                .where(e.rotation_id == rotation_id, e.kind == "evidence")
                .order_by(e.id.asc())
            ).all()
            if not rows:
                self._require_rotation(conn, rotation_id)
        found: dict[str, Event] = {}
        for row in rows:
            ev = _event_from_row(row)
            if ev.trigger:
                found.setdefault(ev.trigger, ev)
        return found

    # ---------------------------------------------------------------- API tokens, idempotency

    def add_token(self, token: ApiToken) -> None:
        try:
            with self._tx() as conn:
                conn.execute(
                    insert(api_tokens_t).values(
                        name=token.name,
                        role=token.role.value,
                        token_hash=token.token_hash,
                        created_at=token.created_at or self._now(),
                        created_by=token.created_by,
                        revoked_at=token.revoked_at,
                    )
                )
        except IntegrityError:
            raise KeyturnError(
                f"a token named {token.name} exists already (revoked tokens keep their name); "
                "choose another --name"
            ) from None

    def token_by_hash(self, token_hash: str) -> ApiToken | None:
        with self._read() as conn:
            row = conn.execute(
                select(api_tokens_t).where(api_tokens_t.c.token_hash == token_hash)
            ).first()
        return _token_from_row(row) if row is not None else None

    def list_tokens(self) -> list[ApiToken]:
        with self._read() as conn:
            rows = conn.execute(select(api_tokens_t).order_by(api_tokens_t.c.name)).all()
        return [_token_from_row(r) for r in rows]

    def revoke_token(self, name: str, at: datetime) -> ApiToken:
        t = api_tokens_t.c
        with self._tx() as conn:
            conn.execute(
                update(api_tokens_t)
                .where(t.name == name, t.revoked_at.is_(None))
                .values(revoked_at=at)
            )
            row = conn.execute(select(api_tokens_t).where(t.name == name)).first()
        if row is None:
            raise NotFound(f"no API token named {name!r}; see `keyturn tokens list`")
        return _token_from_row(row)

    def reserve_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord | None:
        i = idempotency_keys_t.c
        stmt = (
            self._upsert(idempotency_keys_t)
            .values(
                token_name=record.token_name,
                key=record.key,
                fingerprint=record.fingerprint,
                created_at=record.created_at,
            )
            .on_conflict_do_nothing(index_elements=[i.token_name, i.key])
            .returning(i.key)
        )
        with self._tx() as conn:
            if conn.execute(stmt).first() is not None:  # inserted: reserved now
                return None
            row = conn.execute(
                select(idempotency_keys_t).where(
                    i.token_name == record.token_name, i.key == record.key
                )
            ).one()
        return IdempotencyRecord(
            token_name=row.token_name,
            key=row.key,
            fingerprint=row.fingerprint,
            created_at=row.created_at,
            status_code=row.status_code,
            response=row.response,
        )

    def finish_idempotency(
        self, token_name: str, key: str, status_code: int, response: dict[str, Any]
    ) -> None:
        i = idempotency_keys_t.c
        with self._tx() as conn:
            conn.execute(
                update(idempotency_keys_t)
                .where(i.token_name == token_name, i.key == key)
                .values(status_code=status_code, response=response)
            )

    def release_idempotency(self, token_name: str, key: str) -> None:
        i = idempotency_keys_t.c
        with self._tx() as conn:
            conn.execute(
                delete(idempotency_keys_t).where(
                    i.token_name == token_name, i.key == key, i.status_code.is_(None)
                )
            )

    # ------------------------------------------------------------------------------ workers

    def register_worker(self, worker: WorkerRecord) -> None:
        values = _worker_values(worker)
        stmt = self._upsert(workers_t).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[workers_t.c.owner],
            set_={k: v for k, v in values.items() if k != "owner"},
        )
        with self._tx() as conn:
            conn.execute(stmt)

    def heartbeat_worker(self, owner: str, now: datetime) -> bool:
        stmt = update(workers_t).where(workers_t.c.owner == owner).values(heartbeat_at=now)
        with self._tx() as conn:
            return conn.execute(stmt).rowcount > 0

    def stop_worker(self, owner: str, now: datetime) -> None:
        stmt = (
            update(workers_t)
            .where(workers_t.c.owner == owner)
            .values(heartbeat_at=now, stopped_at=now)
        )
        with self._tx() as conn:
            conn.execute(stmt)

    def list_workers(self) -> list[WorkerRecord]:
        stmt = select(workers_t).order_by(workers_t.c.started_at.desc(), workers_t.c.owner.asc())
        with self._read() as conn:
            return [_worker_from_row(r) for r in conn.execute(stmt).all()]

    def get_workers(self, owners: Sequence[str]) -> dict[str, WorkerRecord]:
        wanted = sorted(set(owners))
        if not wanted:
            return {}
        stmt = select(workers_t).where(workers_t.c.owner.in_(wanted))
        with self._read() as conn:
            return {r._mapping["owner"]: _worker_from_row(r) for r in conn.execute(stmt).all()}

    def prune_workers(self, before: datetime) -> int:
        stmt = delete(workers_t).where(workers_t.c.heartbeat_at < before)
        with self._tx() as conn:
            return int(conn.execute(stmt).rowcount or 0)

    def fleet_facts(self, now: datetime, *, counters: bool = True) -> FleetFacts:
        """:class:`keyturn.ports.FleetReader` (what /metrics reports), in metrics_read."""
        from keyturn.adapters.store.metrics_read import fleet_facts

        return fleet_facts(self, now, counters=counters)

    def leases_held(self, now: datetime) -> dict[str, int]:
        r = rotations_t.c
        stmt = (
            select(r.lease_owner, func.count())
            .where(r.finished_at.is_(None), r.lease_owner.is_not(None), r.lease_expires_at > now)
            .group_by(r.lease_owner)
        )
        with self._read() as conn:
            return {str(owner): int(n) for owner, n in conn.execute(stmt).all()}

    # ------------------------------------------------------------------------ sealed secrets

    def get_secret(self, secret_id: str) -> SealedSecret:
        with self._read() as conn:
            row = conn.execute(_SECRET_BY_ID, {"id": secret_id}).first()
        if row is None:
            raise secret_not_found(secret_id)
        return _secret_from_row(row)

    def get_secrets(self, secret_ids: Sequence[str]) -> dict[str, SealedSecret]:
        if not secret_ids:
            return {}
        with self._read() as conn:
            rows = conn.execute(_SECRETS_BY_ID, {"ids": list(secret_ids)}).all()
        return {s.id: s for s in map(_secret_from_row, rows)}

    def all_secrets(self) -> list[SealedSecret]:
        with self._read() as conn:
            rows = conn.execute(select(secrets_t).order_by(secrets_t.c.id)).all()
        return [_secret_from_row(r) for r in rows]

    def replace_secrets(self, sealed: Sequence[SealedSecret]) -> None:
        with self._tx() as conn:
            for secret in sealed:
                done = conn.execute(
                    update(secrets_t)
                    .where(secrets_t.c.id == secret.id)
                    .values(
                        purpose=secret.purpose,
                        master_key_id=secret.master_key_id,
                        nonce=bytes(secret.nonce),
                        ciphertext=bytes(secret.ciphertext),
                    )
                    .returning(secrets_t.c.id)
                ).first()
                if done is None:
                    raise secret_not_found(secret.id)

    def purge_secrets(self, now: datetime) -> list[str]:
        s = secrets_t.c
        with self._tx() as conn:
            ids = conn.execute(
                update(secrets_t)
                .where(s.purge_after.is_not(None), s.purge_after <= now, s.purged_at.is_(None))
                .values(ciphertext=None, purged_at=now)
                .returning(s.id)
            ).scalars()
            return sorted(ids)

    def master_key_ids(self) -> set[str]:
        with self._read() as conn:
            ids = conn.execute(
                select(secrets_t.c.master_key_id)
                .where(secrets_t.c.ciphertext.is_not(None))
                .distinct()
            ).scalars()
            return set(ids)

    # ------------------------------------------------------------------------------ helpers

    def _set_purge_after(self, conn: Connection, secret_id: str, when: datetime | None) -> None:
        done = conn.execute(
            update(secrets_t)
            .where(secrets_t.c.id == secret_id)
            .values(purge_after=when)
            .returning(secrets_t.c.id)
        ).first()
        if done is None:
            raise secret_not_found(secret_id)

    def _require_rotation(self, conn: Connection, rotation_id: str) -> None:
        found = conn.execute(select(rotations_t.c.id).where(rotations_t.c.id == rotation_id))
        if found.first() is None:
            raise rotation_not_found(rotation_id)

    def _insert_secrets(
        self, conn: Connection, secrets: Sequence[SealedSecret], now: datetime
    ) -> None:
        if not secrets:
            return
        ids = [s.id for s in secrets]
        taken = conn.execute(select(secrets_t.c.id).where(secrets_t.c.id.in_(ids))).scalars()
        clash = sorted(taken)
        if clash or len(set(ids)) != len(ids):
            which = ", ".join(clash) or "the same id twice"
            raise KeyturnError(f"secret ids already in use: {which}; generate fresh secret ids")
        conn.execute(insert(secrets_t), [_secret_values(s, now) for s in secrets])

    def _replace_credential(
        self, conn: Connection, credential: ManagedCredential, now: datetime
    ) -> None:
        values = _credential_values(credential, now)
        values.pop("created_at")
        values["updated_at"] = now
        done = conn.execute(
            update(credentials_t)
            .where(credentials_t.c.name == credential.name)
            .values(**values)
            .returning(credentials_t.c.name)
        ).first()
        if done is None:
            raise credential_not_found(credential.name)

    def _upsert_action(self, conn: Connection, action: ActionRecord) -> None:
        """One statement: insert the record, or update it if (rotation, phase, name) exists. A
        new record's seq is the number its rotation already has (the rotation row is locked by
        this transaction's compare-and-set, so nobody else adds one concurrently)."""
        conn.execute(
            self._upsert_action_statement,
            {
                "a_rotation_id": action.rotation_id,
                "a_seq_rotation_id": action.rotation_id,
                "a_phase": Phase(action.phase).value,
                "a_name": action.name,
                "a_idempotency_key": action.idempotency_key,
                "a_status": ActionStatus(action.status).value,
                "a_intent_at": action.intent_at,
                "a_outcome_at": action.outcome_at,
                "a_attempts": action.attempts,
                "a_detail": dict(action.detail),
                "a_error": action.error,
            },
        )

    @cached_property
    def _upsert_action_statement(self) -> Any:
        """The statement of :meth:`_upsert_action`, built once with a bound parameter for each
        value: built per record, its ``excluded`` columns and cache key were a fifth of a
        worker's commit CPU (the SQL is the same)."""
        a = actions_t.c
        seq = (
            select(func.count())
            .select_from(actions_t)
            .where(a.rotation_id == bindparam("a_seq_rotation_id"))
            .scalar_subquery()
        )
        stmt = self._upsert(actions_t).values(
            rotation_id=bindparam("a_rotation_id"),
            phase=bindparam("a_phase"),
            name=bindparam("a_name"),
            seq=seq,
            **{k: bindparam(f"a_{k}") for k in _ACTION_UPSERT_COLUMNS},
        )
        return stmt.on_conflict_do_update(
            index_elements=[a.rotation_id, a.phase, a.name],
            set_={k: stmt.excluded[k] for k in _ACTION_UPSERT_COLUMNS},
        )


@cache
def _claim_statement() -> Any:
    """The statement of SqlStore.claim, built once (see _compare_and_set); the owner, the
    times and the limit are bound parameters, as they were."""
    r = rotations_t.c
    now = bindparam("c_now", type_=r.next_attempt_at.type)
    due = and_(
        r.finished_at.is_(None),
        or_(
            r.request_action.is_not(None),
            and_(
                r.paused.is_(False),
                r.halted_reason.is_(None),
                or_(r.next_attempt_at.is_(None), r.next_attempt_at <= now),
            ),
        ),
        or_(r.lease_expires_at.is_(None), r.lease_expires_at <= now),
    )
    # FOR UPDATE SKIP LOCKED is rendered on PostgreSQL; SQLite has no row locks and
    # relies on the BEGIN IMMEDIATE write lock held by this transaction instead.
    candidates = (
        select(r.id)
        .where(due)
        .order_by(*_claim_order())
        .limit(bindparam("c_limit", type_=Integer))
        .with_for_update(skip_locked=True)
    )
    stmt = (
        update(rotations_t)
        .where(r.id.in_(candidates))
        # In SET, `r.lease_owner` is the value before this UPDATE (SQL semantics, on both
        # databases): the owner of an expired lease that was never released.
        .values(
            lease_owner=bindparam("c_owner"),
            lease_expires_at=bindparam("c_until"),
            lease_taken_at=now,
            lease_taken_from=r.lease_owner,
            version=r.version + 1,
        )
        .returning(rotations_t)
    )
    return stmt


#: Reads a worker makes for every rotation, built once: built per call, a select of every
#: column and its cache key cost more CPU than the round trip (PostgreSQL: get_credential
#: 0.48 ms -> 0.18 ms of CPU per call).
_CREDENTIAL_BY_NAME = select(credentials_t).where(credentials_t.c.name == bindparam("name"))
_SECRET_BY_ID = select(secrets_t).where(secrets_t.c.id == bindparam("id"))
_CREDENTIALS_BY_NAME = select(credentials_t).where(
    credentials_t.c.name.in_(bindparam("names", expanding=True))
)
_SECRETS_BY_ID = select(secrets_t).where(secrets_t.c.id.in_(bindparam("ids", expanding=True)))
_ACTIONS_OF = (
    select(actions_t)
    .where(actions_t.c.rotation_id.in_(bindparam("ids", expanding=True)))
    .order_by(actions_t.c.rotation_id, actions_t.c.seq.asc())
)


@cache
def _compare_and_set(columns: tuple[str, ...]) -> Any:
    """A change's guarded UPDATE of its rotation (those columns, the version and updated_at;
    every value a bound parameter), built once per set of columns: built per change, the
    statement and its cache key cost a commit more CPU than its execution."""
    r = rotations_t.c
    return (
        update(rotations_t)
        .where(r.id == bindparam("u_id"), r.version == bindparam("u_expected"))
        .values(
            **{c: bindparam(f"u_{c}") for c in columns},
            version=r.version + 1,
            updated_at=bindparam("u_now"),
        )
        .returning(rotations_t)
    )


#: The columns an action's upsert writes when its record exists (rotation, phase and name are
#: the conflict's key, seq stays).
_ACTION_UPSERT_COLUMNS = (
    "idempotency_key",
    "status",
    "intent_at",
    "outcome_at",
    "attempts",
    "detail",
    "error",
)


def _unavailable(url: str, exc: DBAPIError) -> StoreUnavailable:
    first = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
    return StoreUnavailable(f"database {redact_url(url)} is unavailable ({first}); will retry")


def _integrity_reason(exc: IntegrityError) -> str:
    """The first line of the driver's message: names the constraint, never the values' secrets."""
    text = str(exc.orig) if exc.orig is not None else str(exc)
    return text.strip().splitlines()[0] if text.strip() else "constraint violated"
