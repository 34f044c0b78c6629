"""An in-memory PasskeyTasks for the user pages' tests (imported as `passkey_tasks_double`):
rotations as the passkey kind would hold them (a link's hash, the task, the evidence), over a
real sandbox through the real Dfns passkey session (plugin.dfns_passkey_session)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from keyturn.kinds.passkey.tasks import (
    REGISTERED,
    SNOOZED,
    LinkRefused,
    LinkTask,
    PasskeyTasks,
    Task,
    link_hash,
    link_matches,
    link_rotation,
    new_link_token,
)
from keyturn.plugin import PasskeyProvider, ProviderAccess, dfns_passkey_session

MAX_SNOOZES = 2


@dataclass
class HeldRotation:
    rotation_id: str
    username: str
    user_id: str | None
    old_credential_uuid: str
    old_credential_id: str
    task: Task
    origin: str
    new_origin: str | None
    may_deactivate: bool
    expires_at: datetime
    link_hash: str = ""
    evidence: dict[str, dict[str, Any]] = field(default_factory=dict)
    finished: bool = False


class TasksDouble(PasskeyTasks):
    def __init__(self, access: ProviderAccess) -> None:
        self.access = access
        self.rotations: dict[str, HeldRotation] = {}
        self.recorded: list[tuple[str, str]] = []

    # ------------------------------------------------------------------ test controls

    def add(
        self,
        rotation_id: str,
        user: Mapping[str, Any],
        *,
        origin: str,
        new_origin: str | None = None,
        may_deactivate: bool = True,
        task: Task = "enrol",
    ) -> str:
        """A rotation of the sandbox end user `user` (its bootstrap entry); its link token."""
        self.rotations[rotation_id] = HeldRotation(
            rotation_id=rotation_id,
            username=str(user["username"]),
            user_id=str(user["user_id"]),
            old_credential_uuid=str(user["credential_uuid"]),
            old_credential_id=str(user["credential_id"]),
            task=task,
            origin=origin,
            new_origin=new_origin,
            may_deactivate=may_deactivate,
            expires_at=datetime.now(UTC) + timedelta(days=7),
        )
        return self.new_link(rotation_id)

    def new_link(self, rotation_id: str, **changes: Any) -> str:
        """A new link for the rotation (the previous one is superseded), with `changes` to the
        task (e.g. task="deactivate", may_deactivate=True after a cutover)."""
        token = new_link_token(rotation_id)
        held = replace(self.rotations[rotation_id], **changes)
        held.link_hash = link_hash(token)
        self.rotations[rotation_id] = held
        return token

    def change(self, rotation_id: str, **changes: Any) -> None:
        self.rotations[rotation_id] = replace(self.rotations[rotation_id], **changes)

    # --------------------------------------------------------------------- the protocol

    def _task(self, held: HeldRotation) -> LinkTask:
        registered = held.evidence.get(REGISTERED, {})
        return LinkTask(
            rotation_id=held.rotation_id,
            username=held.username,
            user_id=held.user_id,
            old_credential_uuid=held.old_credential_uuid,
            old_credential_id=held.old_credential_id,
            task=held.task,
            origin=held.origin,
            new_origin=held.new_origin,
            may_deactivate=held.may_deactivate,
            new_credential_uuid=registered.get("credential_uuid"),
            new_credential_id=registered.get("credential_id"),
            evidence=frozenset(held.evidence),
            expires_at=held.expires_at,
            link_hash=held.link_hash,
        )

    def _actionable(self, rotation_id: str) -> HeldRotation:
        held = self.rotations.get(rotation_id)
        if held is None:
            raise LinkRefused("This link is not valid.")
        if held.finished:
            raise LinkRefused("There is nothing left to do with this link.")
        if held.expires_at <= datetime.now(UTC):
            raise LinkRefused("This link has expired; ask for a new one.")
        return held

    async def open_link(self, token: str) -> LinkTask:
        rotation_id = link_rotation(token)
        held = self.rotations.get(rotation_id) if rotation_id else None
        if held is None or not link_matches(token, held.link_hash):
            raise LinkRefused("This link is not valid (a newer one may have replaced it).")
        return self._task(self._actionable(held.rotation_id))

    async def task(self, rotation_id: str) -> LinkTask:
        return self._task(self._actionable(rotation_id))

    async def record(self, rotation_id: str, name: str, detail: Mapping[str, Any]) -> bool:
        held = self._actionable(rotation_id)
        if name.startswith(f"{SNOOZED}:") and int(name.partition(":")[2]) > MAX_SNOOZES:
            raise LinkRefused("This cannot be put off again; please replace your passkey now.")
        self.recorded.append((rotation_id, name))
        if name in held.evidence:
            return False
        held.evidence[name] = dict(detail)
        return True

    async def provider(self, rotation_id: str) -> PasskeyProvider:
        return dfns_passkey_session(self.access)
