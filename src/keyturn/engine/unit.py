"""The unit of work of one leased rotation: every write is a compare-and-set on the version it
holds, and it alone decides which writes may wait for the next one.

The rule (why holding is safe): every external effect is preceded by an intent commit, which
carries whatever was held, so a held write is never needed before then, and losing it in a
crash is the same as crashing before it (the intent without an outcome is reconciled). So an
intent is written at once, and so is an outcome that carries secrets the provider generated
(nothing else holds them); everything else (outcomes, data, sealed material keyturn made,
transitions) is held when the unit holds writes. A worker's unit holds; one outside a worker
(an operator command) writes at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from keyturn.domain.errors import StaleVersion
from keyturn.domain.model import (
    ActionRecord,
    ActionStatus,
    Event,
    ManagedCredential,
    Phase,
    Rotation,
    SealedSecret,
    evolve,
)
from keyturn.engine.batch import CommitBatcher
from keyturn.ports import Change, Store


def merge(first: Change, then: Change) -> Change:
    """One change that writes what `first` and then `then` write (same rotation)."""
    actions: dict[tuple[Phase, str], ActionRecord] = {}
    for a in (*first.earlier_actions, first.action, *then.earlier_actions, then.action):
        if a is not None:
            actions.pop((a.phase, a.name), None)  # the later record of an action supersedes
            actions[(a.phase, a.name)] = a
    records = list(actions.values())
    last = records.pop() if then.action is not None else None
    return Change(
        first.rotation_id,
        first.expected_version,
        updates={**first.updates, **then.updates},
        events=[*first.events, *then.events],
        action=last,
        earlier_actions=records,
        secrets=[*first.secrets, *then.secrets],
        credential=then.credential if then.credential is not None else first.credential,
        purge_after={**first.purge_after, **then.purge_after},
    )


def must_write_now(change: Change) -> bool:
    action = change.action
    return action is not None and (action.status is ActionStatus.INTENT or bool(change.secrets))


class UnitOfWork:
    def __init__(
        self,
        store: Store,
        rotation: Rotation,
        *,
        batcher: CommitBatcher | None = None,
        hold: bool = False,
        crash_hook: Callable[[str], None] = lambda _b: None,
        on_lease: Callable[[float], None] = lambda _t: None,
    ) -> None:
        self.store = store
        self.rotation = rotation
        self.batcher = batcher
        self.holding = hold
        self._crash_hook = crash_hook
        self._on_lease = on_lease
        self._lock = asyncio.Lock()
        self._held: Change | None = None
        self._held_hooks: list[str] = []
        #: Secrets this unit sealed or wrote (it need not read them back).
        self.sealed: dict[str, SealedSecret] = {}

    @property
    def has_held(self) -> bool:
        return self._held is not None

    async def add(
        self,
        *,
        updates: Mapping[str, Any] | None = None,
        events: Sequence[Event] = (),
        action: ActionRecord | None = None,
        secrets: Sequence[SealedSecret] = (),
        credential: ManagedCredential | None = None,
        purge_after: Mapping[str, datetime | None] | None = None,
        hook: str | None = None,
    ) -> Rotation:
        """Write these, or hold them for the next write when the rule allows it (see the module
        docstring). The rotation's fields change at once either way. `hook` is the crash-hook
        boundary that follows this write's commit."""
        change = Change(
            self.rotation.id,
            self.rotation.version,
            updates=dict(updates or {}),
            events=list(events),
            action=action,
            secrets=list(secrets),
            credential=credential,
            purge_after=dict(purge_after or {}),
        )
        if self.holding and not must_write_now(change):
            async with self._lock:
                self._held = change if self._held is None else merge(self._held, change)
                self.rotation = evolve(self.rotation, change.updates)
                for sealed in change.secrets:
                    self.sealed[sealed.id] = sealed
                if hook is not None:
                    self._held_hooks.append(hook)
            return self.rotation
        return await self._write(change, hook)

    async def write(
        self,
        *,
        updates: Mapping[str, Any] | None = None,
        events: Sequence[Event] = (),
        hook: str | None = None,
    ) -> Rotation:
        """Write now (with whatever is held): a lease renewal, a release, a failure, a halt,
        an operator's change."""
        return await self._write(
            Change(self.rotation.id, self.rotation.version, dict(updates or {}), list(events)),
            hook,
        )

    async def flush(self) -> None:
        if self._held is not None:
            await self.write()

    async def _write(self, change: Change, hook: str | None) -> Rotation:
        async with self._lock:
            merged = change if self._held is None else merge(self._held, change)
            merged.rotation_id = self.rotation.id
            merged.expected_version = self.rotation.version
            started = time.monotonic()
            if self.batcher is not None:
                self.rotation = await self.batcher.commit(merged)
            else:
                self.rotation = await asyncio.to_thread(self.store.commit, merged)
            # Only now is what was held written (a failed commit keeps it held).
            hooks, self._held, self._held_hooks = self._held_hooks, None, []
            for sealed in merged.secrets:
                self.sealed[sealed.id] = sealed
            if "lease_expires_at" in merged.updates:
                self._on_lease(started)
        for boundary in [*hooks, *([hook] if hook is not None else [])]:
            self._crash_hook(boundary)
        return self.rotation

    async def refresh(self) -> Rotation:
        """Write what is held, then read the rotation as the store holds it now; StaleVersion
        when another writer changed it (not while this unit's own write is committing)."""
        await self.flush()
        async with self._lock:
            current = await asyncio.to_thread(self.store.get_rotation, self.rotation.id)
            if current.version != self.rotation.version:
                raise StaleVersion(self.rotation.id, self.rotation.version)
            self.rotation = current
        return current
