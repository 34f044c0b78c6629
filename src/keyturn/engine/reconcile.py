"""`keyturn reconcile`: compare what the provider holds with what the store says. Read only.

Each managed credential's kind does the comparison (what it created, what should be active);
this module only gathers what the store knows and asks.
"""

from __future__ import annotations

from keyturn.domain.errors import KeyturnError
from keyturn.engine.registry import Registry
from keyturn.engine.run import db
from keyturn.engine.spi import Finding, ReconcileInput, Services
from keyturn.ports import Store

__all__ = ["Finding", "reconcile"]


async def reconcile(store: Store, services: Services, registry: Registry) -> list[Finding]:
    findings: list[Finding] = []
    every = await db(store.list_rotations)
    known = frozenset(r.id for r in every)
    for managed in await db(store.list_credentials):
        try:
            kind = registry.kind(managed.kind)
            config = services.credential_config(managed.name)
        except KeyturnError as exc:
            findings.append(Finding("unreachable", managed.name, str(exc)))
            continue
        rotations = [r for r in every if r.credential == managed.name]
        actions = await db(store.actions_of, [r.id for r in rotations if not r.finished])
        item = ReconcileInput(managed, config, rotations, actions, known)
        findings.extend(await kind.reconcile(services, item))
    return findings
