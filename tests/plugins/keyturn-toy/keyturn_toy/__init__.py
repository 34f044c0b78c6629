"""A toy credential kind and deploy target, written as a third party would: it imports
``keyturn.plugin`` and nothing else of keyturn.

The toy provider is a *ledger*: a JSON file of key ids, each with the fingerprint of its
secret and whether it is active. A toy rotation mints a new key, deploys its secret to
``toy_file`` targets, bakes (a wait that holds no lease), then burns the old key: burning
cannot be undone, so rollback is refused from its intent on. Evidence named ``baked`` on the
rotation ends its bake early.

With a ``person`` table, burning the old key waits on a person (the human-task policy): the
toy seals a link for them, asks keyturn to invite them (a ``user_task`` notification), and
waits until they act (a file appears) with reminders, snoozes (a file holding how many they
used) and escalation at the task's deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from keyturn.plugin import (
    Action,
    Call,
    CredentialConfig,
    Detail,
    F,
    Facts,
    Fence,
    Finding,
    Finish,
    ImportSpec,
    KeyturnError,
    Kind,
    ManagedCredential,
    PluginModel,
    R,
    ReconcileInput,
    Reminders,
    Rotation,
    RotationData,
    Services,
    Step,
    StepContext,
    StepError,
    TargetConfig,
    Trigger,
    Wait,
    user_task,
)


def fingerprint(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()[:16]


# ------------------------------------------------------------------------------ the ledger


class Ledger:
    """The toy provider: {key id: {"fingerprint": ..., "active": bool}} in one JSON file."""

    def __init__(self, path: Path, services: Services, fence: Fence | None = None) -> None:
        self.path = path
        self._services = services
        self._fence = fence

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return data

    def _write(self, keys: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(keys, indent=1, sort_keys=True))
        tmp.replace(self.path)

    async def keys(self) -> dict[str, dict[str, Any]]:
        return await self._services.blocking(self._read)

    async def put(self, key_id: str, **fields: Any) -> None:
        if self._fence is not None:
            self._fence()

        def change() -> None:
            keys = self._read()
            keys[key_id] = {**keys.get(key_id, {}), **fields}
            self._write(keys)

        await self._services.blocking(change)

    async def burn(self, key_id: str) -> None:
        if self._fence is not None:
            self._fence()

        def change() -> None:
            keys = self._read()
            keys.pop(key_id, None)
            self._write(keys)

        await self._services.blocking(change)

    async def aclose(self) -> None:
        return None


# ------------------------------------------------------------------------------ the target


class ToyFileConfig(TargetConfig):
    path: Path


class ToyFile:
    def __init__(self, config: ToyFileConfig, services: Services) -> None:
        self.name = config.name or f"toy_file:{config.path}"
        self.path = config.path
        self._services = services

    def _write(self, secret: bytes) -> None:
        if self.path.is_file() and self.path.read_bytes() == secret:
            return  # unchanged: nothing written
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
        tmp.replace(self.path)

    async def deploy(self, secret: bytes) -> None:
        await self._services.blocking(self._write, secret)

    async def read_back(self) -> bytes:
        try:
            return await self._services.blocking(self.path.read_bytes)
        except FileNotFoundError:
            raise KeyturnError(f"target {self.name}: {self.path} is missing") from None


class ToyFilePlugin:
    type = "toy_file"
    description = "a file holding a toy secret"
    config_model = ToyFileConfig
    accepts = frozenset({"toy_secret"})

    def build(self, config: TargetConfig, services: Services) -> ToyFile:
        assert isinstance(config, ToyFileConfig)
        return ToyFile(config, services)


# ------------------------------------------------------------------------------ the kind


class ToyPerson(PluginModel):
    """``[credentials.NAME.person]``: who approves burning the old key, and the task's policy."""

    name: str
    #: The task is due this long after the invitation (schedule seconds).
    due_seconds: float = Field(gt=0)
    remind_before: list[float] = Field(default_factory=list)
    remind_every: float | None = None
    snoozes: int = 0
    snooze_seconds: float = 0.0
    #: Holds the number of snoozes the person used (absent: none).
    snooze_file: Path | None = None
    #: Appears when the person acted.
    acted_file: Path
    escalate: bool = True
    on_due: Literal["halt", "report"] = "halt"
    check_seconds: float = Field(default=3600.0, gt=0)


class ToyConfig(CredentialConfig):
    #: The ledger file (the toy provider).
    ledger: Path
    #: How long the new key bakes on its targets before the old one is burnt.
    bake_seconds: float = Field(default=0.0, ge=0)
    #: How long the bake may wait at most (a bake longer than this halts the rotation).
    bake_deadline_seconds: float = Field(default=3600.0, gt=0)
    #: A person who must act before the old key is burnt (None: nobody).
    person: ToyPerson | None = None


class ToyData(RotationData):
    old_key_id: str
    old_ref: str
    new_key_id: str | None = None
    new_ref: str | None = None
    new_fingerprint: str | None = None
    #: The person asked (from the configuration when the rotation started).
    person: str | None = None
    #: The sealed link sent to them, and their task's deadline (schedule time, ISO).
    link_ref: str | None = None
    person_due: str | None = None


Ctx = StepContext[ToyData, Ledger]


def _config(ctx: Ctx) -> ToyConfig:
    assert isinstance(ctx.config, ToyConfig)
    return ctx.config


async def _generate(ctx: Ctx) -> None:
    if ctx.data.new_ref is not None:
        return
    secret = secrets.token_bytes(32)
    ctx.update(
        new_ref=ctx.seal("toy_secret", secret),
        new_fingerprint=fingerprint(secret),
        new_key_id=f"toy-{ctx.rotation.id}",
    )


async def _mint(ctx: Ctx) -> Detail:
    key_id = ctx.data.new_key_id or ""
    await ctx.session.put(key_id, fingerprint=ctx.data.new_fingerprint, active=True)
    return {"key_id": key_id}


async def _minted(ctx: Ctx) -> Detail | None:
    key_id = ctx.data.new_key_id or ""
    return {"key_id": key_id} if key_id in await ctx.session.keys() else None


async def _deploy(ctx: Ctx, ref: str) -> Detail:
    secret = await ctx.open(ref)
    for target in ctx.targets:
        ctx.fence()
        await target.deploy(secret)
    return {"targets": [t.name for t in ctx.targets], "fingerprint": fingerprint(secret)}


async def _deploy_new(ctx: Ctx) -> Detail:
    return await _deploy(ctx, ctx.data.new_ref or "")


async def _redeploy_old(ctx: Ctx) -> Detail:
    return await _deploy(ctx, ctx.data.old_ref)


#: Evidence that ends a bake early (recorded from outside a worker, e.g. by a test).
BAKED = "baked"


async def _baking(ctx: Ctx) -> str | None:
    bake = _config(ctx).bake_seconds
    deployed = await ctx.record(F, "deploy_new")
    if bake <= 0 or deployed is None or deployed.outcome_at is None:
        return None
    if (ctx.now() - deployed.outcome_at).total_seconds() >= bake:
        return None
    if BAKED in await ctx.evidence():  # somebody said it has baked enough
        return None
    return f"the new key to bake on its targets for {bake:g}s"


async def _burn_old(ctx: Ctx) -> Detail:
    await ctx.session.burn(ctx.data.old_key_id)
    return {"key_id": ctx.data.old_key_id, "burnt": True}


async def _old_burnt(ctx: Ctx) -> Detail | None:
    gone = ctx.data.old_key_id not in await ctx.session.keys()
    return {"key_id": ctx.data.old_key_id, "burnt": True} if gone else None


async def _revoke_new(ctx: Ctx) -> Detail:
    if ctx.data.new_key_id is None:
        return {"revoked": None}
    if ctx.data.new_key_id in await ctx.session.keys():
        await ctx.session.put(ctx.data.new_key_id, active=False)
    return {"revoked": ctx.data.new_key_id}


async def _finish(ctx: Ctx, key_id: str, ref: str) -> Finish:
    credential = await ctx.credential()
    return Finish(
        credential=replace(
            credential,
            credential_id=key_id,
            credential_uuid=key_id,
            key_ref=ref,
            updated_at=ctx.now(),
        )
    )


async def _finish_forward(ctx: Ctx) -> Finish:
    return await _finish(ctx, ctx.data.new_key_id or "", ctx.data.new_ref or "")


async def _finish_rollback(ctx: Ctx) -> Finish:
    return await _finish(ctx, ctx.data.old_key_id, ctx.data.old_ref)


def _person(ctx: Ctx) -> ToyPerson:
    person = _config(ctx).person
    if person is None:
        raise StepError("this toy credential has no [person] table any more", retryable=False)
    return person


async def _seal_link(ctx: Ctx) -> None:
    if ctx.data.link_ref is not None:
        return
    link = f"https://toy.example/task/{secrets.token_urlsafe(24)}"
    due = ctx.schedule_now().timestamp() + _person(ctx).due_seconds
    ctx.update(
        link_ref=ctx.seal("user_link", link.encode()),
        person_due=datetime.fromtimestamp(due, tz=ctx.schedule_now().tzinfo).isoformat(),
    )


async def _invite(ctx: Ctx) -> Detail:
    due = datetime.fromisoformat(ctx.data.person_due or "")
    return user_task(_person(ctx).name, due, ctx.data.link_ref)


def _read_int(path: Path | None) -> int:
    if path is None:
        return 0
    try:
        return int(path.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


async def _person_acted(ctx: Ctx) -> str | None:
    person = _person(ctx)
    if await ctx.services.blocking(person.acted_file.exists):
        return None
    return f"{person.name} to approve burning the old toy key"


def _reminders(ctx: Ctx) -> Reminders:
    person = _person(ctx)
    return Reminders(
        person=person.name,
        due=datetime.fromisoformat(ctx.data.person_due or ""),
        before=person.remind_before,
        then_every=person.remind_every,
        snoozes=person.snoozes,
        snooze_seconds=person.snooze_seconds,
        snoozed=_read_int(person.snooze_file),  # small local file: read inline
        escalate=person.escalate,
        on_due=person.on_due,
        link_ref=ctx.data.link_ref,
    )


def _asks_person(facts: Facts) -> bool:
    return getattr(facts.data, "person", None) is not None


def _to_targets(note: str) -> Any:
    def plan(facts: Facts) -> list[Call]:
        return [Call.target(t, "deploy", note=note) for t in facts.targets]

    return plan


STEPS: Mapping[Trigger, Step[Ctx]] = {
    Trigger.ADD_NEW: Step(
        [
            Action(
                F,
                "mint_new",
                _mint,
                plan=lambda _f: [Call("ledger", op="put", note="new key active")],
                prepare=_generate,
                reconcile=_minted,
                intent=lambda ctx: {"key_id": ctx.data.new_key_id},
            )
        ]
    ),
    Trigger.VERIFY: Step(
        [
            Action(F, "deploy_new", _deploy_new, plan=_to_targets("new secret")),
            Wait(
                F,
                "bake",
                _baking,
                every=lambda ctx: max(1.0, min(60.0, _config(ctx).bake_seconds / 10)),
                deadline=lambda ctx: _config(ctx).bake_deadline_seconds,
                plan=lambda _f: [Call.wait("the bake time")],
            ),
        ]
    ),
    Trigger.DEACTIVATE_OLD: Step(
        [
            Action(
                F,
                "invite_person",
                _invite,
                plan=lambda _f: [Call("person", op="invite", note="a link to approve")],
                prepare=_seal_link,
                when=_asks_person,
            ),
            Wait(
                F,
                "person",
                _person_acted,
                every=lambda ctx: _person(ctx).check_seconds,
                deadline=lambda ctx: _person(ctx).due_seconds,
                plan=lambda _f: [Call.wait("the person")],
                when=_asks_person,
                remind=_reminders,
            ),
            Action(
                F,
                "burn_old",
                _burn_old,
                plan=lambda _f: [Call("ledger", op="burn", note="old key gone for good")],
                reconcile=_old_burnt,
                irreversible=True,
            ),
        ],
        finish=_finish_forward,
    ),
    Trigger.FINISH_ROLLBACK: Step(
        [
            Action(
                R,
                "revoke_new",
                _revoke_new,
                plan=lambda _f: [Call("ledger", op="put", note="new key inactive")],
                when=lambda facts: facts.recorded(F, "mint_new"),
            ),
            Action(R, "redeploy_old", _redeploy_old, plan=_to_targets("old secret")),
        ],
        finish=_finish_rollback,
    ),
}


class ToyKind(Kind):
    name = "toy"
    description = "a toy secret in a JSON ledger (tests the plugin seams)"
    config_model = ToyConfig
    data_model = ToyData
    material = "toy_secret"
    import_spec = ImportSpec(
        material_option="--secret-file",
        material_purpose="toy_secret",
        needs_uuid=False,
        needs_token=False,
    )
    steps = STEPS

    def check_config(
        self, name: str, config: CredentialConfig, signers: Collection[str]
    ) -> str | None:
        assert isinstance(config, ToyConfig)
        if config.ledger.suffix != ".json":
            return f"key credentials.{name}.ledger: a toy ledger is a .json file"
        return None

    def options(self, config: CredentialConfig) -> dict[str, Any]:
        assert isinstance(config, ToyConfig)
        return {"person": config.person.name} if config.person is not None else {}

    def start(self, credential: ManagedCredential, options: Mapping[str, Any]) -> ToyData:
        if credential.key_ref is None:
            raise KeyturnError(f"toy credential {credential.name} has no stored secret")
        return ToyData(
            old_key_id=credential.credential_id,
            old_ref=credential.key_ref,
            person=options.get("person"),
        )

    def retained(self, data: Any) -> Sequence[str]:
        return [data.old_ref]

    def irreversible_words(self) -> str:
        return "a burnt toy key is gone for good"

    async def open_session(self, services: Services, rotation: Rotation, fence: Fence) -> Ledger:
        config = services.credential_config(rotation.credential)
        assert isinstance(config, ToyConfig)
        return Ledger(config.ledger, services, fence)

    def imported(
        self, name: str, config: CredentialConfig, material: bytes, services: Services
    ) -> str:
        if len(material) < 16:
            raise StepError("a toy secret has at least 16 bytes", retryable=False)
        return "toy"

    async def reconcile(self, services: Services, item: ReconcileInput) -> list[Finding]:
        assert isinstance(item.config, ToyConfig)
        keys = await Ledger(item.config.ledger, services).keys()
        name = item.managed.name
        findings = []
        current = keys.get(item.managed.credential_id)
        if current is None or not current.get("active"):
            findings.append(
                Finding(
                    "mismatch",
                    name,
                    f"the current key {item.managed.credential_id} is not active in the ledger",
                )
            )
        ours = {r.id for r in item.rotations}
        for key_id in keys:
            rid = key_id.removeprefix("toy-")
            if key_id.startswith("toy-rot_") and rid not in ours:
                findings.append(
                    Finding("orphan", name, f"key {key_id} was minted by unknown rotation {rid}")
                )
        return findings


TOY = ToyKind()
TOY_FILE = ToyFilePlugin()
