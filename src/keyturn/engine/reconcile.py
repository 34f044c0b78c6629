"""`keyturn reconcile`: compare what the provider holds with what the store says. Read only.

It reports credentials keyturn created (named ``keyturn-<rotation id>``, credId
``kt-<rotation id>``) that no rotation accounts for, and managed credentials or finished
rotations whose recorded provider state disagrees with the provider.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from keyturn.domain.errors import KeyturnError
from keyturn.domain.lifecycle import State
from keyturn.domain.model import ActionStatus, CredentialKind, ManagedCredential, Phase, Rotation
from keyturn.engine.run import db
from keyturn.ports import (
    KeyProviderFactory,
    ProviderCredential,
    Store,
    WebhookInfo,
    WebhookProviderFactory,
)

_CREATED_BY = re.compile(r"^(?:keyturn-|kt-)(rot_[A-Za-z0-9]+)$")


@dataclass(frozen=True)
class Finding:
    kind: str  # "orphan", "mismatch", "unreachable"
    credential: str
    message: str
    rotation_id: str | None = None
    provider_credential_uuid: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def created_by(c: ProviderCredential) -> str | None:
    """The rotation id a provider credential was created by, if keyturn created it."""
    for text in (c.name, c.credential_id):
        m = _CREATED_BY.match(text or "")
        if m:
            return m.group(1)
    return None


async def reconcile(
    store: Store,
    provider_for: KeyProviderFactory,
    webhooks_for: WebhookProviderFactory | None = None,
) -> list[Finding]:
    findings: list[Finding] = []
    for managed in await db(store.list_credentials):
        name = managed.name
        if managed.kind is CredentialKind.WEBHOOK:
            if webhooks_for is not None:
                findings.extend(await _reconcile_webhook(store, webhooks_for, managed))
            continue
        try:
            provider = provider_for(name)
            try:
                creds = await provider.list_credentials()
            finally:
                await provider.aclose()
        except KeyturnError as exc:
            findings.append(Finding("unreachable", name, f"cannot list credentials: {exc}"))
            continue
        by_uuid = {c.credential_uuid: c for c in creds}
        rotations = {r.id: r for r in await db(store.list_rotations, credential=name)}

        for c in creds:
            rid = created_by(c)
            if rid is None:
                continue  # not keyturn's
            rotation = rotations.get(rid)
            if rotation is None:
                findings.append(
                    Finding(
                        "orphan",
                        name,
                        f"credential {c.credential_uuid} was created by rotation {rid}, which "
                        "this store does not know",
                        rid,
                        c.credential_uuid,
                    )
                )
            elif rotation.data.get("new_credential_uuid") != c.credential_uuid and not (
                await _registration_in_flight(store, rotation)
            ):
                findings.append(
                    Finding(
                        "orphan",
                        name,
                        f"credential {c.credential_uuid} was created by rotation {rid}, which "
                        f"recorded {rotation.data.get('new_credential_uuid') or 'no credential'}"
                        " (a duplicate)",
                        rid,
                        c.credential_uuid,
                    )
                )

        current = by_uuid.get(managed.credential_uuid)
        if current is None:
            findings.append(
                Finding(
                    "mismatch",
                    name,
                    f"the current credential {managed.credential_uuid} does not exist at the "
                    "provider",
                    provider_credential_uuid=managed.credential_uuid,
                )
            )
        elif not current.is_active and not _rotation_in_flight(rotations.values()):
            findings.append(
                Finding(
                    "mismatch",
                    name,
                    f"the current credential {managed.credential_uuid} is inactive at the provider",
                    provider_credential_uuid=managed.credential_uuid,
                )
            )
        latest = max(rotations.values(), key=lambda r: r.created_at, default=None)
        if latest is not None:
            findings.extend(_check_latest(name, latest, by_uuid))
    return findings


def _rotation_in_flight(rotations: Any) -> bool:
    return any(not r.finished for r in rotations)


async def _registration_in_flight(store: Store, rotation: Rotation) -> bool:
    if rotation.finished:
        return False
    actions = await db(store.actions, rotation.id)
    return not any(
        a.phase is Phase.FORWARD and a.name == "register_new" and a.status is ActionStatus.DONE
        for a in actions
    )


def _check_latest(name: str, r: Rotation, by_uuid: dict[str, ProviderCredential]) -> list[Finding]:
    old = by_uuid.get(str(r.data.get("old_credential_uuid")))
    new = by_uuid.get(str(r.data.get("new_credential_uuid")))
    out: list[Finding] = []

    def bad(what: str, uuid: str | None) -> None:
        out.append(
            Finding("mismatch", name, f"rotation {r.id} is {r.state.value} but {what}", r.id, uuid)
        )

    if r.state is State.OLD_DEACTIVATED:
        if old is not None and old.is_active:
            bad(f"the old credential {old.credential_uuid} is still active", old.credential_uuid)
        if new is None or not new.is_active:
            bad(
                "its new credential is not active at the provider",
                r.data.get("new_credential_uuid"),
            )
    elif r.state is State.ROLLED_BACK:
        if old is None or not old.is_active:
            bad(
                "the old credential is not active at the provider",
                r.data.get("old_credential_uuid"),
            )
        if new is not None and new.is_active:
            bad(f"the new credential {new.credential_uuid} is still active", new.credential_uuid)
    return out


_WEBHOOK_BY = re.compile(r"^keyturn rotation (rot_[A-Za-z0-9]+)$")


async def _reconcile_webhook(
    store: Store, webhooks_for: WebhookProviderFactory, managed: ManagedCredential
) -> list[Finding]:
    name = managed.name
    try:
        provider = webhooks_for(name)
        try:
            hooks = await provider.list_webhooks()
        finally:
            await provider.aclose()
    except KeyturnError as exc:
        return [Finding("unreachable", name, f"cannot list webhooks: {exc}")]
    findings: list[Finding] = []
    rotations = {r.id: r for r in await db(store.list_rotations, credential=name)}
    all_rotations = {r.id for r in await db(store.list_rotations)}
    by_id: dict[str, WebhookInfo] = {w.id: w for w in hooks}
    for w in hooks:
        m = _WEBHOOK_BY.match(w.description or "")
        if m is None:
            continue
        rid = m.group(1)
        rotation = rotations.get(rid)
        if rotation is None:
            if rid not in all_rotations:  # another managed webhook's rotation reports its own
                findings.append(
                    Finding(
                        "orphan",
                        name,
                        f"webhook {w.id} was created by rotation {rid}, which this store does "
                        "not know",
                        rid,
                        w.id,
                    )
                )
            continue
        if rotation.data.get("new_webhook_id") != w.id and not rotation.finished:
            continue  # its creation is still being reconciled by the rotation itself
        if rotation.data.get("new_webhook_id") != w.id or rotation.state.value == "rolled_back":
            findings.append(
                Finding(
                    "orphan",
                    name,
                    f"webhook {w.id} was created by rotation {rid} ({rotation.state.value}) and "
                    "no rotation keeps it",
                    rid,
                    w.id,
                )
            )
    current = by_id.get(managed.credential_id)
    in_flight = any(not r.finished for r in rotations.values())
    if current is None:
        findings.append(
            Finding(
                "mismatch",
                name,
                f"the current webhook {managed.credential_id} does not exist at the provider",
                provider_credential_uuid=managed.credential_id,
            )
        )
    elif current.status != "Enabled" and not in_flight:
        findings.append(
            Finding(
                "mismatch",
                name,
                f"the current webhook {managed.credential_id} is {current.status}",
                provider_credential_uuid=managed.credential_id,
            )
        )
    return findings
