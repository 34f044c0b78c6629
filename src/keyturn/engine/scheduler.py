"""The scheduler: runs inside every worker and fires the rotations the policies make due.

Each credential with a policy has at most one *scheduled* slot in the store (its nominal time,
when it fires, and the fingerprint of the policy that computed it). A tick is one indexed query
for the slots due now; each is fired by one transaction that marks it fired and creates its
rotation, so a slot fires at most once however many workers tick. A worker whose configuration
gives the credential another policy fingerprint leaves the slot alone and logs why (workers
with different configs never rotate a credential twice). The next slot is planned when a
rotation ends (from the new key's creation), so after any downtime a credential gets one
rotation, not one per missed slot. A credential whose rotation is unfinished (halted, paused,
waiting) is not rotated again: its slot waits and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog

from keyturn.domain.errors import KeyturnError, NotFound, StoreUnavailable
from keyturn.domain.model import ManagedCredential, Slot
from keyturn.domain.schedule import (
    Policy,
    Start,
    format_duration,
    gate,
    next_start,
    place,
)
from keyturn.engine.operator import new_rotation
from keyturn.engine.run import EngineDeps, db
from keyturn.engine.schedtime import ScheduleBook
from keyturn.ports import SlotStore

log = structlog.get_logger("keyturn.scheduler")

#: A planning pass (credentials with a policy and no scheduled slot) runs this often (real s).
PLAN_EVERY_SECONDS = 60.0
#: A slot held back by an unfinished rotation or a limit is looked at again after this long
#: (schedule time) unless the rotation's end plans it anew first.
RECHECK = timedelta(minutes=10)
#: A due slot of another policy fingerprint that this worker has seen due, unfired, for this
#: long on its own clock (at least ten ticks) has no live worker of that configuration (one
#: fires within a tick): a worker of this one plans the credential anew (the old slot
#: superseded, never fired), so a config change everywhere does not leave every credential
#: unscheduled. Real time, not the schedule's: a test clock that jumps does not trigger it.
FOREIGN_GRACE_SECONDS = 60.0


def plan_start(
    book: ScheduleBook,
    name: str,
    managed: ManagedCredential,
    key_created: datetime,
    now: datetime,
    peers: Sequence[datetime] = (),
    after: datetime | None = None,
) -> tuple[Policy, Start] | None:
    """The credential's next start by the configured policy (None: it has none)."""
    policy = book.policy_of(name)
    if policy is None:
        return None
    start = next_start(policy, book.freezes, name, key_created, now, peers, after)
    return (policy, start) if start is not None else None


class Scheduler:
    def __init__(self, deps: EngineDeps, *, owner: str) -> None:
        assert deps.schedule is not None and deps.slots is not None
        self.deps = deps
        self.book: ScheduleBook = deps.schedule
        self.slots: SlotStore = deps.slots
        self.owner = owner
        #: Slots this worker's configuration does not fire (another fingerprint).
        self._foreign: set[tuple[str, datetime]] = set()
        #: When this worker first saw each foreign slot due (its own clock).
        self._foreign_due: dict[tuple[str, datetime], datetime] = {}
        self.fired = 0
        self.ticks = 0

    # ------------------------------------------------------------------ the loop

    async def run(self, stopping: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        last_plan = -PLAN_EVERY_SECONDS
        while not stopping.is_set():
            try:
                await db(self.deps.time.sync)
                if loop.time() - last_plan >= PLAN_EVERY_SECONDS:
                    await self.plan_all()
                    last_plan = loop.time()
                await self.tick()
            except StoreUnavailable as exc:
                log.warning("scheduler: database unavailable; next tick retries", error=str(exc))
            except KeyturnError as exc:
                log.warning("scheduler tick failed; next tick retries", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self.book.tick_seconds)

    # ------------------------------------------------------------------ planning

    async def _key_created(
        self, managed: ManagedCredential, known: tuple[datetime, datetime] | None = None
    ) -> datetime:
        """When the credential's current key was created, on the schedule's clock: as first
        seen (recorded with its slots), else converted now (a key seen for the first time was
        just imported or just rotated to)."""
        created = managed.updated_at or managed.created_at
        assert created is not None
        if known is not None and known[0] == created:
            return known[1]
        return min(self.deps.time.of_local(created), self.deps.time.now())

    async def plan_all(self) -> int:
        """Plan a slot for every credential with a policy that has none (and no unfinished
        rotation); how many were planned."""
        scheduled = [c for c, p in self.book.policies.items() if p.scheduled]
        names = await db(self.slots.unplanned, scheduled)
        if not names:
            return 0
        managed = await db(self.deps.store.get_credentials, names)
        fired = await db(self.slots.last_fired, names)
        known = await db(self.slots.keys_created, names)
        now = self.deps.time.now()
        peers: dict[str, list[datetime]] = {}
        planned = 0
        for name in names:
            cred = managed.get(name)
            policy = self.book.policy_of(name)
            if cred is None or policy is None:
                continue
            group = policy.group
            if group is not None and policy.stagger and group not in peers:
                peers[group] = await db(self.slots.group_starts, group, now - policy.stagger)
            slot = await self._slot(
                name, cred, now, peers.get(group or "", []), fired.get(name), known.get(name)
            )
            if slot is None:
                continue
            if await db(self.slots.plan_slot, slot):
                planned += 1
                if group is not None and group in peers:
                    peers[group].append(slot.due_at)
        if planned:
            log.info("scheduler planned slots", count=planned, owner=self.owner)
        return planned

    async def _slot(
        self,
        name: str,
        cred: ManagedCredential,
        now: datetime,
        peers: Sequence[datetime],
        after: datetime | None,
        known: tuple[datetime, datetime] | None = None,
    ) -> Slot | None:
        created = await self._key_created(cred, known)
        found = plan_start(self.book, name, cred, created, now, peers, after)
        if found is None:
            return None
        policy, start = found
        fingerprint = self.book.fingerprint(name)
        assert fingerprint is not None
        return Slot(
            credential=name,
            slot=start.slot,
            due_at=start.at,
            fingerprint=fingerprint,
            policy=policy.name,
            group=policy.group,
            why=start.why,
            note="; ".join(start.notes) or None,
            planned_by=self.owner,
            key_recorded_at=cred.updated_at or cred.created_at,
            key_created=created,
            created_at=now,
        )

    async def finished(self, credential: str) -> None:
        """A rotation of `credential` ended: plan its next slot from its new key."""
        try:
            await self.replan(credential)
        except KeyturnError as exc:  # the planning pass repairs it
            log.warning("could not plan the next slot", credential=credential, error=str(exc))

    async def replan(self, credential: str, *, take_over: bool = False) -> Slot | None:
        """Plan the credential's next slot from its current key (superseding its scheduled
        one); a slot of another policy fingerprint is left alone unless `take_over`."""
        policy = self.book.policy_of(credential)
        if policy is None:
            return None
        existing = (await db(self.slots.scheduled_slots, [credential])).get(credential)
        mine = self.book.fingerprint(credential)
        try:
            cred = await db(self.deps.store.get_credential, credential)
        except NotFound:
            return None
        stale = existing is not None and existing.key_recorded_at != (
            cred.updated_at or cred.created_at
        )  # planned from a key the credential no longer has: whoever fires it plans anew
        if existing is not None and existing.fingerprint != mine and not (take_over or stale):
            self._mismatch(existing)
            return None
        now = self.deps.time.now()
        peers: list[datetime] = []
        if policy.group is not None and policy.stagger:
            peers = await db(self.slots.group_starts, policy.group, now - policy.stagger)
            if existing is not None and existing.due_at in peers:
                peers.remove(existing.due_at)
        after = (await db(self.slots.last_fired, [credential])).get(credential)
        known = (await db(self.slots.keys_created, [credential])).get(credential)
        slot = await self._slot(credential, cred, now, peers, after, known)
        if slot is None:
            return existing
        if existing is not None and existing.slot == slot.slot:
            owned = existing.fingerprint == slot.fingerprint
            if existing.key_recorded_at != slot.key_recorded_at or not owned:
                # the same slot, counted anew (from another key, or by this policy)
                await db(
                    self.slots.postpone_slot,
                    credential,
                    slot.slot,
                    slot.due_at,
                    slot.note,
                    key_recorded_at=slot.key_recorded_at,
                    fingerprint=None if owned else slot.fingerprint,
                )
                return slot
            return existing
        replaces = existing.slot if existing is not None else None
        return slot if await db(self.slots.plan_slot, slot, replaces=replaces) else None

    def _unowned(self, slot: Slot) -> bool:
        local = self.deps.clock.now()
        first = self._foreign_due.setdefault((slot.credential, slot.slot), local)
        grace = max(FOREIGN_GRACE_SECONDS, 10 * self.book.tick_seconds)
        return (local - first).total_seconds() > grace

    async def _take_over(self, slot: Slot) -> None:
        log.warning(
            "slot of another policy fingerprint unfired past its due time; planning the "
            "credential by this worker's policy",
            credential=slot.credential,
            slot=slot.slot.isoformat(),
            slot_fingerprint=slot.fingerprint,
            our_fingerprint=self.book.fingerprint(slot.credential),
        )
        if await self.replan(slot.credential, take_over=True) is not None:
            self._foreign.discard((slot.credential, slot.slot))
            self._foreign_due.pop((slot.credential, slot.slot), None)

    def _mismatch(self, slot: Slot) -> None:
        key = (slot.credential, slot.slot)
        if key in self._foreign:
            return
        self._foreign.add(key)
        log.warning(
            "slot left to workers of its policy: this worker's config gives the credential "
            "another policy fingerprint",
            credential=slot.credential,
            slot=slot.slot.isoformat(),
            slot_fingerprint=slot.fingerprint,
            our_fingerprint=self.book.fingerprint(slot.credential),
            planned_by=slot.planned_by,
        )

    # ------------------------------------------------------------------ firing

    async def tick(self) -> int:
        """Fire the due slots: one query for them, one read of their credentials and of their
        unfinished rotations, one transaction for the fires. How many rotations were created."""
        self.ticks += 1
        now = self.deps.time.now()
        due = await db(self.slots.due_slots, now, self.book.batch + len(self._foreign))
        mine: list[tuple[Slot, Policy]] = []
        for slot in due:
            policy = self.book.policy_of(slot.credential)
            if policy is None or self.book.fingerprint(slot.credential) != slot.fingerprint:
                self._mismatch(slot)
                if policy is not None and self._unowned(slot):
                    await self._take_over(slot)
                continue
            mine.append((slot, policy))
        if not mine:
            return 0
        names = [slot.credential for slot, _ in mine]
        creds = await db(self.deps.store.get_credentials, names)
        unfinished = await db(self.slots.unfinished, names)
        limits: dict[tuple[str, str], list[Any]] = {}
        batch: list[tuple[Slot, Any, Any]] = []
        for slot, policy in mine:
            made = await self._decide(slot, policy, creds, unfinished, limits, now)
            if made is not None:
                batch.append((slot, *made))
        fired = await self._fire_all(batch)
        self.fired += fired
        return fired

    async def _decide(
        self,
        slot: Slot,
        policy: Policy,
        creds: dict[str, ManagedCredential],
        unfinished: dict[str, Any],
        limits: dict[tuple[str, str], list[Any]],
        now: datetime,
    ) -> tuple[Any, Any] | None:
        """The rotation (and its event) a due slot fires now, or None (held back, replanned)."""
        name = slot.credential
        cred = creds.get(name)
        if cred is None:
            await db(self.slots.close_slot, name, slot.slot, "skipped", "no longer managed")
            return None
        held = await self._held_back(name, policy, now, unfinished.get(name), limits)
        if held is None and slot.key_recorded_at != (cred.updated_at or cred.created_at):
            current = (await db(self.slots.scheduled_slots, [name])).get(name)
            if current is not None and current.slot == slot.slot:
                # the key changed since the slot was planned (rotated by hand): plan from it
                await self.replan(name)
            return None  # (else fired or replanned by another worker since the tick read it)
        if held is not None:
            until, note = held
            if until is None:
                until = now + RECHECK
            log.info("slot held back", credential=name, slot=slot.slot.isoformat(), why=note)
            await db(self.slots.postpone_slot, name, slot.slot, until, note)
            return None
        made = await self._rotation(slot, cred, policy)
        if made is not None:  # counts for the slots after it in this tick
            for key in _limit_keys(policy, self.book.providers.get(name)):
                if key in limits:
                    limits[key][0] += 1
                    limits[key][1] = now
        return made

    async def _held_back(
        self,
        name: str,
        policy: Policy,
        now: datetime,
        latest: Any,
        cache: dict[tuple[str, str], list[Any]] | None = None,
    ) -> tuple[datetime | None, str] | None:
        """Why the slot may not fire now, and until when (None: look again later)."""
        if latest is not None and not latest.finished:
            what = f"halted: {latest.halted_reason}" if latest.halted_reason else latest.state
            return None, f"not fired: rotation {latest.id} is unfinished ({what})"
        closed = gate(policy, self.book.freezes, now)
        if closed is not None:
            return closed[0], f"not fired: {closed[1]}"
        return await self.limits(name, policy, now, cache)

    async def limits(
        self,
        name: str,
        policy: Policy,
        now: datetime,
        cache: dict[tuple[str, str], list[Any]] | None = None,
    ) -> tuple[datetime | None, str] | None:
        """The group's and the provider's limits at `now` (also asked by a manual rotate).
        `cache`: what a tick read already ([in flight, last start] per group and provider)."""
        cache = {} if cache is None else cache
        group = policy.group
        if group is not None and (policy.stagger or policy.max_concurrent):
            key = ("group", group)
            if key not in cache:
                count, _ = await db(self.slots.in_flight, self.book.members(group))
                last = await db(self.slots.group_last_start, group)
                cache[key] = [count, last]
            count, last = cache[key]
            if policy.max_concurrent is not None and count >= policy.max_concurrent:
                return (
                    None,
                    f"group {group} has {count} rotation(s) in flight "
                    f"(max_concurrent {policy.max_concurrent})",
                )
            if policy.stagger and last is not None and now - last < policy.stagger:
                until = place(policy, self.book.freezes, last + policy.stagger)
                return (
                    until,
                    f"stagger {format_duration(policy.stagger)} in group {group}: "
                    f"the last start was at {last.isoformat(timespec='seconds')}",
                )
        provider = self.book.providers.get(name)
        limit = self.book.provider_limits.get(provider or "")
        if provider is not None and limit is not None:
            key = ("provider", provider)
            if key not in cache:
                cache[key] = [await db(self.slots.in_flight_of_provider, provider), None]
            count = cache[key][0]
            if count >= limit:
                return (
                    None,
                    f"provider {provider} has {count} rotation(s) in flight "
                    f"(max_concurrent_rotations {limit})",
                )
        return None

    async def _fire_all(self, batch: list[tuple[Slot, Any, Any]]) -> int:
        if not batch:
            return 0
        now = self.deps.time.now()
        outcomes = await db(self.slots.fire_slots, batch, now)
        fired = 0
        for (slot, rotation, _), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, KeyturnError):
                note = f"not fired: {outcome}"
                await db(self.slots.postpone_slot, slot.credential, slot.slot, now + RECHECK, note)
            elif outcome:
                fired += 1
                log.info(
                    "slot fired",
                    credential=slot.credential,
                    slot=slot.slot.isoformat(),
                    rotation=rotation.id,
                    policy=slot.policy,
                )
        return fired

    async def _rotation(
        self, slot: Slot, cred: ManagedCredential, policy: Policy
    ) -> tuple[Any, Any] | None:
        deps = self.deps
        name = slot.credential
        try:
            cfg: Any = deps.services.credential_config(name)
            options = deps.registry.kind(cred.kind).options(cfg)
            return new_rotation(
                deps.registry,
                deps.clock,
                cred,
                reason=f"scheduled by policy {policy.name} ({slot.why}; slot "
                f"{slot.slot.isoformat(timespec='seconds')})",
                actor=f"scheduler:{self.owner}",
                options=options,
                detail={"slot": slot.slot.isoformat(), "policy": policy.name},
            )
        except KeyturnError as exc:  # e.g. no stored key: say so on the slot, look again later
            log.warning("slot cannot fire", credential=name, error=str(exc))
            note = f"not fired: {exc}"
            await db(self.slots.postpone_slot, name, slot.slot, deps.time.now() + RECHECK, note)
            return None


def _limit_keys(policy: Policy, provider: str | None) -> list[tuple[str, str]]:
    keys = [("group", policy.group)] if policy.group is not None else []
    return keys + ([("provider", provider)] if provider is not None else [])
