"""An in-memory :class:`keyturn.ports.Store`, for unit tests of the engine.

Same semantics as the SQL store (the contract suite runs against both): compare-and-set on the
version, one unfinished rotation per credential, all-or-nothing commits, claims that never hand
one rotation to two owners. Thread-safe (one lock); everything handed out is a copy, and JSON
fields go through a JSON round trip exactly as they would through a database.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from keyturn.adapters.store.sql import (
    UPDATABLE_FIELDS,
    claim_sort_key,
    credential_not_found,
    rotation_not_found,
    secret_not_found,
)
from keyturn.domain.errors import AlreadyRotating, KeyturnError, StaleVersion
from keyturn.domain.lifecycle import State
from keyturn.domain.model import (
    ActionRecord,
    ActionStatus,
    Event,
    ManagedCredential,
    OperatorAction,
    OperatorRequest,
    Phase,
    Rotation,
    SealedSecret,
    WorkerRecord,
)
from keyturn.domain.notify import Notice, notice_for
from keyturn.ports import Change, RotationQuery

#: Rotation fields that hold a datetime (stored aware UTC; a naive one is refused).
_DATETIME_FIELDS = frozenset(
    {"next_attempt_at", "lease_expires_at", "finished_at", "wait_since", "wait_deadline"}
)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"naive datetime {value.isoformat()} given to the store; pass an aware UTC datetime"
        )
    return value.astimezone(UTC)


def _utc1(value: datetime) -> datetime:
    result = _utc(value)
    assert result is not None
    return result


def _json(value: dict[str, Any]) -> dict[str, Any]:
    """What a JSON column gives back (and a TypeError now, not in production, if it cannot)."""
    result: dict[str, Any] = json.loads(json.dumps(value))
    return result


def _request(request: OperatorRequest | None) -> OperatorRequest | None:
    if request is None:
        return None
    at = _utc(request.at)
    assert at is not None
    return OperatorRequest(
        action=OperatorAction(request.action), actor=request.actor, reason=request.reason, at=at
    )


class MemoryStore:
    """The Store port in process memory. ``MemoryStore(clock=...)`` to control ``updated_at``."""

    def __init__(self, *, clock: Callable[[], datetime] | None = None) -> None:
        self._now = clock or _utcnow
        self._lock = threading.RLock()
        self._credentials: dict[str, ManagedCredential] = {}
        self._rotations: dict[str, Rotation] = {}
        self._events: list[Event] = []
        self._next_event_id = 1
        self._actions: dict[str, dict[tuple[str, str], ActionRecord]] = {}
        self._secrets: dict[str, SealedSecret] = {}
        self._workers: dict[str, WorkerRecord] = {}
        #: The outbox: the notifications of the events committed (keyturn.domain.notify).
        self._notices: list[Notice] = []

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._rotations)} rotations)"

    def close(self) -> None:
        """Nothing to release (for symmetry with SqlStore)."""

    @contextmanager
    def _tx(self) -> Iterator[None]:
        """All or nothing: on any exception, restore the state as it was."""
        with self._lock:
            saved = (
                dict(self._credentials),
                dict(self._rotations),
                list(self._events),
                self._next_event_id,
                {k: dict(v) for k, v in self._actions.items()},
                dict(self._secrets),
                list(self._notices),
            )
            try:
                yield
            except BaseException:
                (
                    self._credentials,
                    self._rotations,
                    self._events,
                    self._next_event_id,
                    self._actions,
                    self._secrets,
                    self._notices,
                ) = saved
                raise

    # ------------------------------------------------------------------ managed credentials

    def add_credential(
        self, credential: ManagedCredential, secrets: Sequence[SealedSecret]
    ) -> None:
        now = self._now()
        with self._tx():
            if credential.name in self._credentials:
                raise KeyturnError(
                    f"a managed credential named {credential.name} already exists; "
                    "choose another name or see `keyturn credentials list`"
                )
            self._insert_secrets(secrets, now)
            self._check_secret_refs(credential)
            self._credentials[credential.name] = replace(
                credential,
                kind=str(credential.kind),
                created_at=_utc(credential.created_at) or now,
                updated_at=_utc(credential.updated_at) or now,
            )

    def get_credential(self, name: str) -> ManagedCredential:
        with self._lock:
            found = self._credentials.get(name)
            if found is None:
                raise credential_not_found(name)
            return copy.deepcopy(found)

    def get_credentials(self, names: Sequence[str]) -> dict[str, ManagedCredential]:
        with self._lock:
            return {n: copy.deepcopy(self._credentials[n]) for n in names if n in self._credentials}

    def list_credentials(self) -> list[ManagedCredential]:
        with self._lock:
            return [copy.deepcopy(self._credentials[n]) for n in sorted(self._credentials)]

    def page_credentials(self, *, limit: int, after: str | None = None) -> list[ManagedCredential]:
        """:class:`keyturn.ports.CredentialPager`."""
        with self._lock:
            names = [n for n in sorted(self._credentials) if after is None or n > after]
            return [copy.deepcopy(self._credentials[n]) for n in names[:limit]]

    # ---------------------------------------------------------------------------- rotations

    def create_rotation(self, rotation: Rotation, event: Event) -> Rotation:
        with self._tx():
            if rotation.credential not in self._credentials:
                raise credential_not_found(rotation.credential)
            existing = self._unfinished_of(rotation.credential)
            if existing is not None and rotation.finished_at is None:
                raise AlreadyRotating(rotation.credential, existing.id)
            if rotation.id in self._rotations:
                raise KeyturnError(f"a rotation with id {rotation.id} already exists; use a new id")
            stored = replace(
                rotation,
                kind=str(rotation.kind),
                state=State(rotation.state),
                version=1,
                created_at=_utc1(rotation.created_at),
                updated_at=_utc1(rotation.updated_at),
                next_attempt_at=_utc(rotation.next_attempt_at),
                lease_expires_at=_utc(rotation.lease_expires_at),
                lease_taken_at=_utc(rotation.lease_taken_at),
                finished_at=_utc(rotation.finished_at),
                wait_since=_utc(rotation.wait_since),
                wait_deadline=_utc(rotation.wait_deadline),
                request=_request(rotation.request),
                rollback_from=State(rotation.rollback_from) if rotation.rollback_from else None,
                paused=bool(rotation.paused),
                data=_json(rotation.data),
            )
            self._rotations[stored.id] = stored
            self._append_event(event)
            return copy.deepcopy(stored)

    def get_rotation(self, rotation_id: str) -> Rotation:
        with self._lock:
            return copy.deepcopy(self._rotation(rotation_id))

    def list_rotations(
        self, *, state: State | None = None, credential: str | None = None
    ) -> list[Rotation]:
        with self._lock:
            found = [
                r
                for r in self._rotations.values()
                if (state is None or r.state == State(state))
                and (credential is None or r.credential == credential)
            ]
            found.sort(key=lambda r: (r.created_at, r.id), reverse=True)
            return copy.deepcopy(found)

    def find_rotations(self, query: RotationQuery) -> list[Rotation]:
        """Narrowed by state, credential, kind, updated_since and the keyset; `status` and
        `attention` are left to the engine's definition (the widest condition the port
        allows: this store reads every row anyway)."""
        with self._lock:
            found = [
                r
                for r in self._rotations.values()
                if (query.state is None or r.state == State(query.state))
                and (query.credential is None or r.credential == query.credential)
                and (query.kind is None or r.kind == query.kind)
                and (query.holder is None or r.lease_owner == query.holder)
                and (query.updated_since is None or r.updated_at >= query.updated_since)
                and (query.before is None or (r.created_at, r.id) < query.before)
            ]
            found.sort(key=lambda r: (r.created_at, r.id), reverse=True)
            if query.limit is not None:
                found = found[: query.limit]
            return copy.deepcopy(found)

    def has_pending_work(self, horizon: datetime) -> bool:
        with self._lock:
            return any(
                r.finished_at is None
                and not r.paused
                and r.halted_reason is None
                and (r.next_attempt_at is None or r.next_attempt_at <= horizon)
                for r in self._rotations.values()
            )

    def rotation_ids(self, prefix: str, *, limit: int = 2) -> list[str]:
        with self._lock:
            return sorted(r for r in self._rotations if r.startswith(prefix))[:limit]

    def latest_rotation(self, credential: str) -> Rotation | None:
        found = self.list_rotations(credential=credential)
        return found[0] if found else None

    def events(self, rotation_id: str) -> list[Event]:
        with self._lock:
            self._rotation(rotation_id)
            return copy.deepcopy([e for e in self._events if e.rotation_id == rotation_id])

    def actions(self, rotation_id: str) -> list[ActionRecord]:
        with self._lock:
            self._rotation(rotation_id)
            return copy.deepcopy(list(self._actions.get(rotation_id, {}).values()))

    def actions_of(self, rotation_ids: Sequence[str]) -> dict[str, list[ActionRecord]]:
        with self._lock:
            return {r: copy.deepcopy(list(self._actions.get(r, {}).values())) for r in rotation_ids}

    def claim(
        self, *, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[Rotation]:
        if limit <= 0:
            return []
        now_utc = _utc(now)
        until = _utc(lease_until)
        assert now_utc is not None
        with self._tx():
            due = sorted(
                (r for r in self._rotations.values() if _is_due(r, now_utc)),
                key=claim_sort_key,
            )[:limit]
            claimed = []
            for r in due:
                leased = replace(
                    r,
                    lease_owner=owner,
                    lease_expires_at=until,
                    lease_taken_at=now_utc,
                    lease_taken_from=r.lease_owner,
                    version=r.version + 1,
                )
                self._rotations[r.id] = leased
                claimed.append(leased)
            return copy.deepcopy(claimed)

    def commit_many(self, changes: Sequence[Change]) -> list[Rotation | KeyturnError]:
        results: list[Rotation | KeyturnError] = []
        for change in changes:
            try:
                results.append(self.commit(change))
            except KeyturnError as exc:
                results.append(exc)
        return results

    def commit(self, change: Change) -> Rotation:  # noqa: C901 - a check per Change field
        unknown = sorted(set(change.updates) - UPDATABLE_FIELDS)
        if unknown:
            raise ValueError(
                f"Change.updates has fields a commit cannot set: {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(UPDATABLE_FIELDS))}"
            )
        now = self._now()
        with self._tx():
            current = self._rotation(change.rotation_id)
            if current.version != change.expected_version:
                raise StaleVersion(change.rotation_id, change.expected_version)
            fields: dict[str, Any] = {}
            for key, value in change.updates.items():
                if key in _DATETIME_FIELDS:
                    fields[key] = _utc(value)
                elif key in ("state", "rollback_from"):
                    fields[key] = State(value) if value is not None else None
                elif key == "request":
                    fields[key] = _request(value)
                elif key == "data":
                    fields[key] = _json(dict(value or {}))
                elif key == "paused":
                    fields[key] = bool(value)
                else:
                    fields[key] = value
            updated = replace(current, **fields, version=current.version + 1, updated_at=_utc1(now))
            if updated.finished_at is None and current.finished_at is not None:
                other = self._unfinished_of(updated.credential)
                if other is not None and other.id != updated.id:
                    raise KeyturnError(
                        f"commit to rotation {updated.id} refused by the database: credential "
                        f"{updated.credential} already has an unfinished rotation ({other.id})"
                    )
            self._rotations[updated.id] = updated
            self._insert_secrets(change.secrets, now)
            if change.credential is not None:
                self._replace_credential(change.credential, now)
            for secret_id, when in change.purge_after.items():
                secret = self._secrets.get(secret_id)
                if secret is None:
                    raise secret_not_found(secret_id)
                self._secrets[secret_id] = replace(secret, purge_after=_utc(when))
            for ev in change.events:
                self._append_event(ev)
            for earlier in change.earlier_actions:
                self._upsert_action(earlier)
            if change.action is not None:
                self._upsert_action(change.action)
            return copy.deepcopy(updated)

    def request(
        self,
        rotation_id: str,
        request: OperatorRequest,
        event: Event,
        *,
        expected_version: int | None = None,
    ) -> Rotation:
        now = self._now()
        with self._tx():
            current = self._rotation(rotation_id)
            if expected_version is not None and (
                current.version != expected_version or current.request is not None
            ):
                raise StaleVersion(rotation_id, expected_version)
            req = _request(request)
            assert req is not None
            updated = replace(current, request=req, next_attempt_at=req.at, updated_at=_utc1(now))
            self._rotations[rotation_id] = updated
            self._append_event(event)
            return copy.deepcopy(updated)

    def append_event(self, event: Event) -> None:
        with self._tx():
            self._rotation(event.rotation_id)
            self._append_event(event)

    def campaign_rotations(self, campaign: str | None = None) -> list[Rotation]:
        with self._lock:
            found = [
                r
                for r in self._rotations.values()
                if r.campaign is not None and campaign in (None, r.campaign)
            ]
        return sorted(found, key=lambda r: (r.created_at, r.id))

    def add_evidence(self, event: Event) -> bool:
        with self._tx():
            rotation = self._rotation(event.rotation_id)
            if event.trigger in self._evidence_of(event.rotation_id):
                return False
            self._append_event(replace(event, kind="evidence"))
            at = _utc1(event.at)
            due = rotation.next_attempt_at
            if (
                rotation.finished_at is None
                and rotation.lease_owner is None
                and (due is None or due > at)
            ):
                self._rotations[rotation.id] = replace(rotation, next_attempt_at=at)
            return True

    def wake_waiting(self, at: datetime, rotation_id: str | None = None) -> int:
        at = _utc1(at)
        woken = 0
        with self._tx():
            for r in list(self._rotations.values()):
                due = r.next_attempt_at
                if (
                    rotation_id in (None, r.id)
                    and r.finished_at is None
                    and r.wait_key is not None
                    and r.lease_owner is None
                    and (due is None or due > at)
                ):
                    self._rotations[r.id] = replace(r, next_attempt_at=at)
                    woken += 1
        return woken

    def evidence(self, rotation_id: str) -> dict[str, Event]:
        with self._lock:
            self._rotation(rotation_id)
            return self._evidence_of(rotation_id)

    def _evidence_of(self, rotation_id: str) -> dict[str, Event]:
        found: dict[str, Event] = {}
        for e in self._events:
            if e.rotation_id == rotation_id and e.kind == "evidence" and e.trigger:
                found.setdefault(e.trigger, e)
        return found

    # ------------------------------------------------------------------------------ workers

    def register_worker(self, worker: WorkerRecord) -> None:
        stored = replace(
            worker,
            pid=int(worker.pid),
            started_at=_utc1(worker.started_at),
            heartbeat_at=_utc1(worker.heartbeat_at),
            stopped_at=_utc(worker.stopped_at),
            concurrency=int(worker.concurrency),
            heartbeat_seconds=float(worker.heartbeat_seconds),
            lease_seconds=float(worker.lease_seconds),
        )
        with self._lock:
            self._workers[worker.owner] = stored

    def heartbeat_worker(self, owner: str, now: datetime) -> bool:
        at = _utc1(now)
        with self._lock:
            found = self._workers.get(owner)
            if found is None:
                return False
            self._workers[owner] = replace(found, heartbeat_at=at)
            return True

    def stop_worker(self, owner: str, now: datetime) -> None:
        at = _utc1(now)
        with self._lock:
            found = self._workers.get(owner)
            if found is not None:
                self._workers[owner] = replace(found, heartbeat_at=at, stopped_at=at)

    def list_workers(self) -> list[WorkerRecord]:
        with self._lock:
            found = sorted(self._workers.values(), key=lambda w: w.owner)
            found.sort(key=lambda w: w.started_at, reverse=True)
            return found

    def get_workers(self, owners: Sequence[str]) -> dict[str, WorkerRecord]:
        with self._lock:
            return {o: self._workers[o] for o in owners if o in self._workers}

    def prune_workers(self, before: datetime) -> int:
        cutoff = _utc1(before)
        with self._lock:
            gone = [o for o, w in self._workers.items() if w.heartbeat_at < cutoff]
            for owner in gone:
                del self._workers[owner]
            return len(gone)

    def leases_held(self, now: datetime) -> dict[str, int]:
        at = _utc1(now)
        held: dict[str, int] = {}
        with self._lock:
            for r in self._rotations.values():
                if (
                    r.finished_at is None
                    and r.lease_owner is not None
                    and r.lease_expires_at is not None
                    and r.lease_expires_at > at
                ):
                    held[r.lease_owner] = held.get(r.lease_owner, 0) + 1
        return held

    # ------------------------------------------------------------------------ sealed secrets

    def get_secret(self, secret_id: str) -> SealedSecret:
        with self._lock:
            found = self._secrets.get(secret_id)
            if found is None:
                raise secret_not_found(secret_id)
            return copy.deepcopy(found)

    def get_secrets(self, secret_ids: Sequence[str]) -> dict[str, SealedSecret]:
        with self._lock:
            return {i: copy.deepcopy(self._secrets[i]) for i in secret_ids if i in self._secrets}

    def all_secrets(self) -> list[SealedSecret]:
        with self._lock:
            return [copy.deepcopy(self._secrets[i]) for i in sorted(self._secrets)]

    def replace_secrets(self, sealed: Sequence[SealedSecret]) -> None:
        with self._tx():
            for secret in sealed:
                old = self._secrets.get(secret.id)
                if old is None:
                    raise secret_not_found(secret.id)
                self._secrets[secret.id] = replace(
                    old,
                    purpose=secret.purpose,
                    master_key_id=secret.master_key_id,
                    nonce=bytes(secret.nonce),
                    ciphertext=bytes(secret.ciphertext),
                )

    def purge_secrets(self, now: datetime) -> list[str]:
        now_utc = _utc(now)
        assert now_utc is not None
        with self._tx():
            purged = []
            for secret_id, s in self._secrets.items():
                if s.purge_after is not None and s.purge_after <= now_utc and s.purged_at is None:
                    self._secrets[secret_id] = replace(s, ciphertext=b"", purged_at=now_utc)
                    purged.append(secret_id)
            return sorted(purged)

    def master_key_ids(self) -> set[str]:
        with self._lock:
            return {s.master_key_id for s in self._secrets.values() if s.purged_at is None}

    # ------------------------------------------------------------------------------ helpers

    def _rotation(self, rotation_id: str) -> Rotation:
        found = self._rotations.get(rotation_id)
        if found is None:
            raise rotation_not_found(rotation_id)
        return found

    def _unfinished_of(self, credential: str) -> Rotation | None:
        for r in self._rotations.values():
            if r.credential == credential and r.finished_at is None:
                return r
        return None

    def _append_event(self, event: Event) -> None:
        if event.rotation_id not in self._rotations:
            raise KeyturnError(
                f"event for rotation {event.rotation_id} refused: no such rotation in this store"
            )
        self._events.append(
            replace(event, id=self._next_event_id, at=_utc1(event.at), detail=_json(event.detail))
        )
        self._next_event_id += 1
        notice = notice_for(event, self._rotations[event.rotation_id])
        if notice is not None:  # in the outbox with its event, as the SQL store writes it
            self._notices.append(notice)

    def notices(self) -> list[Notice]:
        """The outbox's notifications, oldest first (what the SQL store's outbox holds)."""
        with self._lock:
            return list(self._notices)

    def _insert_secrets(self, secrets: Sequence[SealedSecret], now: datetime) -> None:
        ids = [s.id for s in secrets]
        clash = sorted(i for i in set(ids) if i in self._secrets)
        if clash or len(set(ids)) != len(ids):
            which = ", ".join(clash) or "the same id twice"
            raise KeyturnError(f"secret ids already in use: {which}; generate fresh secret ids")
        for s in secrets:
            self._secrets[s.id] = replace(
                s,
                nonce=bytes(s.nonce),
                ciphertext=bytes(s.ciphertext),
                created_at=_utc(s.created_at) or _utc(now),
                purge_after=_utc(s.purge_after),
                purged_at=_utc(s.purged_at),
            )

    def _check_secret_refs(self, credential: ManagedCredential) -> None:
        for ref in (credential.key_ref, credential.token_ref):
            if ref is not None and ref not in self._secrets:
                raise KeyturnError(
                    f"cannot store managed credential {credential.name}: it refers to secret "
                    f"{ref}, which is not stored; store the sealed secret with it"
                )

    def _replace_credential(self, credential: ManagedCredential, now: datetime) -> None:
        old = self._credentials.get(credential.name)
        if old is None:
            raise credential_not_found(credential.name)
        self._check_secret_refs(credential)
        self._credentials[credential.name] = replace(
            credential,
            kind=str(credential.kind),
            created_at=old.created_at,
            updated_at=_utc1(now),
        )

    def _upsert_action(self, action: ActionRecord) -> None:
        if action.rotation_id not in self._rotations:
            raise rotation_not_found(action.rotation_id)
        key = (Phase(action.phase).value, action.name)
        for rid, records in self._actions.items():
            for k, rec in records.items():
                if rec.idempotency_key == action.idempotency_key and (rid, k) != (
                    action.rotation_id,
                    key,
                ):
                    raise KeyturnError(
                        f"commit refused: idempotency key {action.idempotency_key} is already "
                        f"used by action {k[1]} of rotation {rid}"
                    )
        records = self._actions.setdefault(action.rotation_id, {})
        records[key] = replace(
            action,
            phase=Phase(action.phase),
            status=ActionStatus(action.status),
            intent_at=_utc1(action.intent_at),
            outcome_at=_utc(action.outcome_at),
            detail=_json(action.detail),
        )


def _is_due(r: Rotation, now: datetime) -> bool:
    if r.finished_at is not None:
        return False
    if r.lease_expires_at is not None and r.lease_expires_at > now:
        return False
    if r.request is not None:
        return True
    return (
        not r.paused
        and r.halted_reason is None
        and (r.next_attempt_at is None or r.next_attempt_at <= now)
    )
