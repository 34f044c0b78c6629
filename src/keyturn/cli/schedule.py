"""What `keyturn plan`, `rotate --dry-run` and `credentials list` say about the schedule: when
each credential's next rotations start and why, and, from the planner, the exact external calls
each would make, in order. Reads only: nothing here writes to the store or calls a provider."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from keyturn.domain.lifecycle import State
from keyturn.domain.model import ManagedCredential, Rotation, Slot
from keyturn.domain.schedule import Policy, deactivation_at, format_duration, next_start
from keyturn.engine.planner import plan as plan_actions
from keyturn.engine.registry import discovered

if TYPE_CHECKING:
    from keyturn.cli.wiring import Wiring
    from keyturn.engine.spi import PlannedAction

#: At most this many planned rotations per credential (an `every = "1m"` over a year).
MAX_PER_CREDENTIAL = 100


@dataclass
class Planned:
    credential: str
    policy: str | None
    at: datetime
    slot: datetime | None
    why: str
    notes: list[str] = field(default_factory=list)
    key_age: timedelta | None = None
    deactivate_not_before: datetime | None = None
    gates: list[str] = field(default_factory=list)
    actions: list[PlannedAction] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "credential": self.credential,
            "policy": self.policy,
            "at": self.at.isoformat(),
            "slot": self.slot.isoformat() if self.slot else None,
            "why": self.why,
            "notes": self.notes,
            "key_age_seconds": self.key_age.total_seconds() if self.key_age else None,
            "deactivate_not_before": self.deactivate_not_before.isoformat()
            if self.deactivate_not_before
            else None,
            "gates": self.gates,
            "actions": [
                {
                    "step": p.trigger.value,
                    "name": p.name,
                    "irreversible": p.irreversible,
                    "calls": [
                        {
                            "what": c.what,
                            "text": c.describe(),
                            "provider_requests": c.provider_requests(),
                            "repeat": c.repeat,
                        }
                        for c in p.calls
                    ],
                }
                for p in self.actions
            ],
        }


def calls_of(w: Wiring, managed: ManagedCredential) -> list[PlannedAction]:
    """The planner's actions of a new rotation of `managed`, from pending to the end."""
    registry = discovered()
    kind = registry.kind(managed.kind)
    cfg = w.config.configured(managed.name)
    options = kind.options(cfg) if cfg is not None else {}
    now = w.clock.now()
    rotation = Rotation(
        id="rot_planned",
        credential=managed.name,
        kind=managed.kind,
        state=State.PENDING,
        version=1,
        reason="plan",
        created_at=now,
        updated_at=now,
        data=kind.start(managed, options).model_dump(mode="json", exclude_none=True),
    )
    # built as a worker builds them, for their names (building one calls nothing)
    targets = [registry.target(t.type).build(t, w).name for t in cfg.targets] if cfg else []
    probes = [registry.probe(p.type).build(p, w).name for p in cfg.probes] if cfg else []
    return plan_actions(registry, rotation, [], targets=targets, probes=probes)


def _gates(policy: Policy) -> list[str]:
    out = []
    if policy.approval == "before_start":
        out.append(f"approval before start (timeout {format_duration(policy.approval_timeout)})")
    if policy.bake:
        out.append(f"bake {format_duration(policy.bake)} in verified")
    if policy.approval == "before_deactivate":
        out.append(
            f"approval before deactivate_old (timeout {format_duration(policy.approval_timeout)})"
        )
    if policy.windows:
        out.append("deactivate_old in a window: " + "; ".join(w.describe() for w in policy.windows))
    return out


def plan_fleet(
    w: Wiring, *, until: datetime, credential: str | None = None, with_calls: bool = True
) -> tuple[list[Planned], list[str]]:
    """Every rotation that would start before `until` (the earliest first), and what keeps
    a credential from being scheduled (one line each)."""
    cfg = w.config
    store = w.store
    time = w.schedule_time
    now = time.now()
    names = [credential] if credential is not None else sorted(cfg.scheduled_policies)
    managed = store.get_credentials(names)
    slots: dict[str, Slot] = w.slots.scheduled_slots(names)
    fired = w.slots.last_fired(names)
    known = w.slots.keys_created(names)
    out: list[Planned] = []
    notes: list[str] = []
    peers: dict[str, list[datetime]] = {}
    for s in w.slots.scheduled_slots(None).values() if credential is None else slots.values():
        if s.group is not None:
            peers.setdefault(s.group, []).append(s.due_at)
    for name in names:
        policy = cfg.policy_of(name)
        cred = managed.get(name)
        if policy is None or not policy.scheduled:
            why = f"policy {policy.name} has no every, cron or max_age" if policy else "no policy"
            notes.append(f"{name}: {why}; rotated by hand only")
            continue
        if cred is None:
            notes.append(f"{name}: not managed yet; import it with `keyturn credentials import`")
            continue
        latest = store.latest_rotation(name)
        if latest is not None and not latest.finished:
            what = f"halted: {latest.halted_reason}" if latest.halted_reason else latest.state
            notes.append(f"{name}: rotation {latest.id} is unfinished ({what}); not rotated again")
        group = peers.setdefault(policy.group, []) if policy.group else []
        ctx = _One(w, name, policy, cred, slots.get(name), fired.get(name), group, now, until)
        ctx.known = known.get(name)
        out.extend(ctx.run(notes, with_calls))
    out.sort(key=lambda p: (p.at, p.credential))
    return out, notes


@dataclass
class _One:
    w: Wiring
    name: str
    policy: Policy
    cred: ManagedCredential
    existing: Slot | None
    after: datetime | None
    group: list[datetime]
    now: datetime
    until: datetime
    known: tuple[datetime, datetime] | None = None

    def run(self, notes: list[str], with_calls: bool) -> list[Planned]:
        w, name, policy, existing = self.w, self.name, self.policy, self.existing
        book = w.schedule_book
        created_local = self.cred.updated_at or self.cred.created_at
        assert created_local is not None
        key_created = key_created_at(w, created_local, self.known)
        calls = calls_of(w, self.cred) if with_calls else []
        mine = book.fingerprint(name)
        after = self.after
        out: list[Planned] = []
        for _ in range(MAX_PER_CREDENTIAL):
            if existing is not None:
                if existing.fingerprint != mine:
                    notes.append(
                        f"{name}: its scheduled slot was planned by another policy (fingerprint "
                        f"{existing.fingerprint}, this config gives {mine}); workers of this "
                        "config leave it alone"
                    )
                item = Planned(
                    name, existing.policy, max(existing.due_at, self.now), existing.slot,
                    existing.why, [existing.note] if existing.note else [],
                )  # fmt: skip
            else:
                start = next_start(
                    policy, book.freezes, name, key_created, self.now, self.group, after
                )
                if start is None:
                    notes.append(f"{name}: no allowed start within the horizon")
                    break
                item = Planned(
                    name, policy.name, start.at, start.slot, start.why, list(start.notes)
                )
                self.group.append(start.at)
            if item.at > self.until:
                break
            item.key_age = item.at - key_created
            item.gates = _gates(policy)
            item.deactivate_not_before = deactivation_at(
                policy, book.freezes, item.at + policy.bake
            )
            item.actions = calls
            out.append(item)
            # the next one: as if the key were created when this rotation starts
            key_created, after, existing = item.at, item.slot, None
        return out


def key_created_at(
    w: Wiring, recorded: datetime, known: tuple[datetime, datetime] | None
) -> datetime:
    """As the scheduler counts it (see Scheduler._key_created)."""
    if known is not None and known[0] == recorded:
        return known[1]
    t = w.schedule_time
    return min(t.of_local(recorded), t.now())


def inventory(w: Wiring, creds: Sequence[ManagedCredential]) -> list[dict[str, Any]]:
    """Per credential: key age, last rotation, next due rotation (next_rotation_at), policy."""
    cfg = w.config
    time = w.schedule_time
    now = time.now()
    slots = w.slots.scheduled_slots([c.name for c in creds])
    known = w.slots.keys_created([c.name for c in creds])
    rows = []
    for c in creds:
        created = c.updated_at or c.created_at
        latest = w.store.latest_rotation(c.name)
        policy = cfg.policy_of(c.name)
        slot = slots.get(c.name)
        nxt: datetime | None = slot.due_at if slot is not None else None
        born = key_created_at(w, created, known.get(c.name)) if created else None
        if nxt is None and policy is not None and born is not None:
            start = next_start(policy, cfg.freezes, c.name, born, now)
            nxt = start.at if start is not None else None
        rows.append(
            {
                "key_created_at": created.isoformat() if created else None,
                "key_age_seconds": (now - born).total_seconds() if born else None,
                "last_rotation": latest.id if latest else None,
                "last_rotation_state": latest.state.value if latest else None,
                "last_rotation_at": latest.created_at.isoformat() if latest else None,
                "next_rotation_at": nxt.isoformat() if nxt else None,
                "policy": policy.name if policy else None,
            }
        )
    return rows
