"""`keyturn reconcile`: compare what the provider holds with what the store says. Read only.

Each managed credential's kind does the comparison (what it created, what should be active);
this module only gathers what the store knows and asks.
"""

from __future__ import annotations

from datetime import UTC, datetime

from keyturn.domain.errors import KeyturnError
from keyturn.domain.model import Rotation
from keyturn.engine.attention import attention
from keyturn.engine.registry import Registry
from keyturn.engine.run import db
from keyturn.engine.spi import Finding, ReconcileInput, Services
from keyturn.ports import Store

__all__ = ["Finding", "reconcile"]


def _needing_a_human(rotations: list[Rotation], now: datetime) -> list[Finding]:
    """Halted rotations, and rotations whose holder is gone, are findings too: the store and
    the provider may agree while a rotation sits stuck half-way."""
    out = []
    for r in rotations:
        why = attention(r, now)
        if r.halted_reason:
            out.append(
                Finding("halted", r.credential, f"rotation {r.id} is halted in {r.state.value}: "
                        f"{' '.join(r.halted_reason.split())}", r.id)
            )  # fmt: skip
        elif why is not None and why.startswith("holder"):
            out.append(
                Finding("stuck", r.credential, f"rotation {r.id} in {r.state.value}: {why}; "
                        "start `keyturn worker` to take it over", r.id)
            )  # fmt: skip
    return out


async def reconcile(store: Store, services: Services, registry: Registry) -> list[Finding]:
    findings: list[Finding] = []
    every = await db(store.list_rotations)
    now = datetime.now(UTC)
    known = frozenset(r.id for r in every)
    for managed in await db(store.list_credentials):
        try:
            kind = registry.kind(managed.kind)
            config = services.credential_config(managed.name)
        except KeyturnError as exc:
            findings.append(Finding("unreachable", managed.name, str(exc)))
            continue
        rotations = [r for r in every if r.credential == managed.name]
        findings.extend(_needing_a_human(rotations, now))
        actions = await db(store.actions_of, [r.id for r in rotations if not r.finished])
        item = ReconcileInput(managed, config, rotations, actions, known)
        findings.extend(await kind.reconcile(services, item))
    return findings
