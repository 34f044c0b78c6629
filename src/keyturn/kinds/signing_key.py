"""Signing-key rotation: service accounts, and PATs (keys registered on the PAT's linked user;
holders get the new private key and the new credential id together, in one deployment).

Forward: generate and seal the new key -> register it, signed by the old key -> new_added;
deploy to every target, read back, prove a signature made with what was read back ->
verified; deactivate the old credential, signed by the new key -> old_deactivated.
Rollback undoes, in reverse, whatever the action records say happened.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from keyturn.plugin import (
    Action,
    Call,
    CredentialConfig,
    DeployedMaterial,
    Detail,
    F,
    Facts,
    Finding,
    Finish,
    KeyProvider,
    KeyturnError,
    Kind,
    ManagedCredential,
    Phase,
    ProviderAccess,
    ProviderCredential,
    R,
    ReconcileInput,
    Rotation,
    RotationData,
    Services,
    SigningKey,
    State,
    Step,
    StepContext,
    StepError,
    TargetOp,
    Trigger,
    Wait,
    dfns_key_session,
)
from keyturn.plugin import Fence as FenceFn

ALGORITHMS = ("ed25519", "ecdsa-p256", "rsa-2048")


class SigningKeyConfig(CredentialConfig):
    #: How a new key is registered: Create Credential, or the service-account credential endpoint.
    registration: Literal["credentials", "service_account_endpoint"] = "credentials"
    algorithm: Literal["ed25519", "ecdsa-p256", "rsa-2048"] = "ed25519"
    #: With probes: how often the holders are asked which key they use, and how long keyturn
    #: waits for all of them to report the new key before it halts (the old key stays active).
    holder_check_seconds: float = Field(default=5.0, gt=0)
    holder_deadline_seconds: float = Field(default=3600.0, gt=0)


class SigningKeyData(RotationData):
    old_credential_id: str
    old_credential_uuid: str
    old_key_ref: str
    old_algorithm: str
    algorithm: str = "ed25519"
    via: str = "credentials"
    new_key_ref: str | None = None
    new_public_key: str | None = None
    new_fingerprint: str | None = None
    new_credential_id: str | None = None
    new_credential_uuid: str | None = None


Ctx = StepContext[SigningKeyData, KeyProvider]


def fingerprint(public_pem: str) -> str:
    """A short, non-secret identifier of a public key, for logs and records."""
    return hashlib.sha256(_norm(public_pem).encode()).hexdigest()[:16]


def _norm(pem: str) -> str:
    return "".join(pem.split())


def _need(value: str | None, what: str) -> str:
    if value is None:
        raise KeyturnError(f"the rotation data has no {what}")
    return value


# ------------------------------------------------------------------------------ actions


async def _key(ctx: Ctx, which: str) -> SigningKey:
    d = ctx.data
    if which == "old":
        return SigningKey(d.old_credential_id, await ctx.open(d.old_key_ref))
    return SigningKey(
        _need(d.new_credential_id, "new credential id"),
        await ctx.open(_need(d.new_key_ref, "new key")),
    )


async def _generate(ctx: Ctx) -> None:
    # Secret material keyturn generates is sealed and committed before the provider hears of
    # it, so a crash after the call never orphans a credential.
    if ctx.data.new_key_ref is not None:
        return
    key = ctx.keys.generate(ctx.data.algorithm)
    ref = ctx.seal("private_key", key.private_pem)
    ctx.update(
        new_key_ref=ref,
        new_public_key=key.public_pem,
        new_fingerprint=fingerprint(key.public_pem),
        new_credential_id=f"kt-{ctx.rotation.id}",
    )


async def _register(ctx: Ctx) -> Detail:
    created = await ctx.session.register_key(
        signer=await _key(ctx, "old"),
        new_key=await _key(ctx, "new"),
        name=f"keyturn-{ctx.rotation.id}",
        via=ctx.data.via,
    )
    return _cred_detail(created)


async def _find_registered(ctx: Ctx) -> Detail | None:
    d = ctx.data
    found = _find(
        await ctx.session.list_credentials(),
        _need(d.new_public_key, "new public key"),
        _need(d.new_credential_id, "new credential id"),
    )
    return _cred_detail(found) if found else None


def _registered(ctx: Ctx, detail: Detail) -> None:
    ctx.update(
        new_credential_id=detail["credential_id"], new_credential_uuid=detail["credential_uuid"]
    )


def _plan_register(facts: Facts) -> list[Call]:
    if facts.data.via == "credentials":
        return [
            Call.provider("POST", "/auth/credentials/init"),
            Call.provider("POST", "/auth/credentials", signed=True, note="new key registered"),
        ]
    return [
        Call.provider(
            "POST", "/auth/service-accounts/credentials", signed=True, note="new key registered"
        )
    ]


def _op(ctx: Ctx, phase: str) -> TargetOp:
    return TargetOp(ctx.rotation.id, ctx.rotation.credential, phase)


async def _new_material(ctx: Ctx) -> DeployedMaterial:
    new = await _key(ctx, "new")
    uuid = _need(ctx.data.new_credential_uuid, "new credential uuid")
    return DeployedMaterial(new.private_key_pem, new.credential_id, uuid)


async def _old_material(ctx: Ctx) -> DeployedMaterial:
    old = await _key(ctx, "old")
    return DeployedMaterial(old.private_key_pem, old.credential_id, ctx.data.old_credential_uuid)


def _on_target(ctx: Ctx, detail: Detail) -> Detail:
    return {"target": ctx.target.name, **detail}


async def _stage_new(ctx: Ctx) -> Detail:
    return _on_target(ctx, await ctx.target.stage(await _new_material(ctx), _op(ctx, "stage")))


async def _promote_new(ctx: Ctx) -> Detail:
    detail = await ctx.target.promote(await _new_material(ctx), _op(ctx, "promote"))
    return _on_target(ctx, detail)


async def _restore_old(ctx: Ctx) -> Detail:
    detail = await ctx.target.rollback(await _old_material(ctx), _op(ctx, "rollback"))
    return _on_target(ctx, detail)


def _target_intent(ctx: Ctx) -> dict[str, Any]:
    return {"target": ctx.target.name}


def _plan_target(op: str, note: str) -> Any:
    def plan(facts: Facts) -> list[Call]:
        return [Call.target(facts.target or "", op, note=note)]

    return plan


async def _prove(ctx: Ctx, expected: DeployedMaterial, public_pem: str, *, staged: bool) -> Detail:
    """Every target holds the expected key and ids (``staged``: in its staged place), and the
    provider accepts a signature made with the key as each target holds it."""
    proved = []
    for target in ctx.targets:
        try:
            held = await target.read_back(staged=staged)
        except KeyturnError as exc:
            said = str(exc)
            named = said if target.name in said else f"target {target.name}: {said}"
            raise StepError(named, retryable=True) from exc
        # The bytes keyturn deployed are the expected key (no parse needed); anything else
        # must at least be the same key.
        same_key = held.private_key_pem == expected.private_key_pem or _norm(
            ctx.keys.public_pem(held.private_key_pem)
        ) == _norm(public_pem)
        if not same_key or (
            held.credential_id != expected.credential_id
            or held.credential_uuid != expected.credential_uuid
        ):
            raise StepError(
                f"target {target.name} does not hold the expected key and credential id "
                f"(expected key {fingerprint(public_pem)}, credential {expected.credential_id})",
                retryable=True,
            )
        # Prove with what the target holds, not with keyturn's own copy.
        await ctx.session.prove(signer=SigningKey(held.credential_id, held.private_key_pem))
        proved.append(target.name)
    if not ctx.targets:
        await ctx.session.prove(signer=SigningKey(expected.credential_id, expected.private_key_pem))
    return {"targets": proved, "fingerprint": fingerprint(public_pem)}


async def _prove_new(ctx: Ctx) -> Detail:
    key = _need(ctx.data.new_public_key, "key")
    return await _prove(ctx, await _new_material(ctx), key, staged=True)


async def _prove_old(ctx: Ctx) -> Detail:
    material = await _old_material(ctx)
    return await _prove(ctx, material, ctx.keys.public_pem(material.private_key_pem), staged=False)


def _plan_prove(staged: bool) -> Any:
    op = "read_back staged" if staged else "read_back"

    def plan(facts: Facts) -> list[Call]:
        handshake = [
            Call.provider("POST", "/auth/action/init"),
            Call.provider("POST", "/auth/action"),
        ]
        calls: list[Call] = []
        for t in facts.targets or [""]:
            if t:
                calls.append(Call.target(t, op))
            calls += handshake
        return calls

    return plan


def _holders(side: str) -> Any:
    """The wait until every probe reports the `side` key's fingerprint."""

    async def check(ctx: Ctx) -> str | None:
        if side == "new":
            want = _need(ctx.data.new_fingerprint, "new fingerprint")
        else:
            want = fingerprint(ctx.keys.public_pem(await ctx.open(ctx.data.old_key_ref)))
        behind = []
        for probe in ctx.probes:
            try:
                seen = await probe.fingerprint()
            except KeyturnError as exc:
                behind.append(f"{probe.name} ({exc})")
                continue
            if seen != want:
                behind.append(f"{probe.name} (uses key {seen})")
        if not behind:
            return None
        return f"the holders to use the {side} key {want}: waiting for {'; '.join(behind)}"

    def config(ctx: Ctx) -> SigningKeyConfig:
        assert isinstance(ctx.config, SigningKeyConfig)
        return ctx.config

    return Wait(
        F if side == "new" else R,
        f"holders_{side}",
        check,
        every=lambda ctx: config(ctx).holder_check_seconds,
        deadline=lambda ctx: config(ctx).holder_deadline_seconds,
        plan=lambda facts: [
            Call.probe(p, "fingerprint", note=f"{side} key in use") for p in facts.probes
        ],
        when=lambda facts: bool(facts.probes),
    )


async def _deactivate_old(ctx: Ctx) -> Detail:
    uuid = ctx.data.old_credential_uuid
    await ctx.session.deactivate(signer=await _key(ctx, "new"), credential_uuid=uuid)
    return {"credential_uuid": uuid, "is_active": False}


async def _old_is_inactive(ctx: Ctx) -> Detail | None:
    uuid = ctx.data.old_credential_uuid
    old = _by_uuid(await ctx.session.list_credentials(), uuid)
    if old is not None and not old.is_active:
        return {"credential_uuid": uuid, "is_active": False}
    return None


async def _reactivate_old(ctx: Ctx) -> Detail:
    uuid = ctx.data.old_credential_uuid
    current = _by_uuid(await ctx.session.list_credentials(), uuid)
    if current is None or not current.is_active:
        await ctx.session.activate(signer=await _key(ctx, "new"), credential_uuid=uuid)
    return {"credential_uuid": uuid, "is_active": True}


def _plan_reactivate(facts: Facts) -> list[Call]:
    note = "old credential active again"
    if not facts.done(F, "deactivate_old"):
        note += " (only if it is inactive)"
    return [
        Call.provider("GET", "/auth/credentials"),
        Call.provider("PUT", "/auth/credentials/activate", signed=True, note=note),
    ]


async def _deactivate_new(ctx: Ctx) -> Detail:
    d = ctx.data
    found = _find(
        await ctx.session.list_credentials(),
        _need(d.new_public_key, "new public key"),
        d.new_credential_id or "",
    )
    if found is None:
        return {"found": False}
    if found.is_active:
        await ctx.session.deactivate(
            signer=await _key(ctx, "old"), credential_uuid=found.credential_uuid
        )
    return {"found": True, "credential_uuid": found.credential_uuid, "is_active": False}


def _deactivated_new(ctx: Ctx, detail: Detail) -> None:
    if detail.get("found") and ctx.data.new_credential_uuid is None:
        # adopted after an unknown outcome: record which credential it was
        ctx.update(new_credential_uuid=detail["credential_uuid"])


def _plan_deactivate_new(facts: Facts) -> list[Call]:
    note = "new credential inactive"
    if not facts.done(F, "register_new"):
        note += " (only if it was created)"
    return [
        Call.provider("GET", "/auth/credentials"),
        Call.provider("PUT", "/auth/credentials/deactivate", signed=True, note=note),
    ]


async def _finish(ctx: Ctx, side: str, purge_after: dict[str, datetime | None]) -> Finish:
    """The managed credential points at the `side` key from now on, in the same transaction as
    the final transition, and key retention is scheduled."""
    d = ctx.data
    credential = await ctx.credential()
    if side == "new":
        ids = (_need(d.new_credential_id, "id"), _need(d.new_credential_uuid, "uuid"))
        key_ref, algorithm = _need(d.new_key_ref, "new key"), d.algorithm
    else:
        ids = (d.old_credential_id, d.old_credential_uuid)
        key_ref, algorithm = d.old_key_ref, d.old_algorithm
    return Finish(
        credential=replace(
            credential,
            credential_id=ids[0],
            credential_uuid=ids[1],
            key_ref=key_ref,
            algorithm=algorithm,
            updated_at=ctx.now(),
        ),
        purge_after=purge_after,
    )


async def _finish_forward(ctx: Ctx) -> Finish:
    return await _finish(ctx, "new", {ctx.data.old_key_ref: ctx.now() + ctx.retention})


async def _finish_rollback(ctx: Ctx) -> Finish:
    purge: dict[str, datetime | None] = {ctx.data.old_key_ref: None}
    if ctx.data.new_key_ref is not None:
        purge[ctx.data.new_key_ref] = ctx.now() + ctx.retention
    return await _finish(ctx, "old", purge)


def _recorded(phase: Phase, name: str) -> Any:
    return lambda facts: facts.recorded(phase, name)


async def _finish_add_new(ctx: Ctx) -> Finish:
    """The add_new transition's event records the new side's id."""
    return Finish(detail={"new_credential_uuid": ctx.data.new_credential_uuid})


STEPS: Mapping[Trigger, Step[Ctx]] = {
    Trigger.ADD_NEW: Step(
        [
            Action(
                F,
                "register_new",
                _register,
                plan=_plan_register,
                prepare=_generate,
                reconcile=_find_registered,
                intent=lambda ctx: {"fingerprint": ctx.data.new_fingerprint, "via": ctx.data.via},
                done=_registered,
            )
        ],
        finish=_finish_add_new,
    ),
    Trigger.VERIFY: Step(
        [
            # Stage on every target, prove what each holds in its staged place signs at the
            # provider, promote every target (one action each: a crash between two promotes
            # is a boundary), then wait for every holder to report the new key.
            Action(
                F,
                "stage_new",
                _stage_new,
                plan=_plan_target("stage", "new key staged"),
                intent=_target_intent,
                each_target=True,
            ),
            Action(F, "prove_new", _prove_new, plan=_plan_prove(staged=True)),
            Action(
                F,
                "promote_new",
                _promote_new,
                plan=_plan_target("promote", "new key is what holders load"),
                intent=_target_intent,
                each_target=True,
            ),
            _holders("new"),
        ]
    ),
    Trigger.DEACTIVATE_OLD: Step(
        [
            Action(
                F,
                "deactivate_old",
                _deactivate_old,
                plan=lambda _f: [
                    Call.provider(
                        "PUT",
                        "/auth/credentials/deactivate",
                        signed=True,
                        note="old credential inactive",
                    )
                ],
                reconcile=_old_is_inactive,
                intent=lambda ctx: {"credential_uuid": ctx.data.old_credential_uuid},
            )
        ],
        finish=_finish_forward,
    ),
    Trigger.FINISH_ROLLBACK: Step(
        [
            # 1. Reactivate the old credential if a deactivation may have happened.
            Action(
                R,
                "reactivate_old",
                _reactivate_old,
                plan=_plan_reactivate,
                when=_recorded(F, "deactivate_old"),
                intent=lambda ctx: {"credential_uuid": ctx.data.old_credential_uuid},
            ),
            # 2. Put the old key back on every target (idempotent; done even if the new key
            #    never reached them, so the targets end up holding exactly the old key).
            Action(
                R,
                "restore_old",
                _restore_old,
                plan=_plan_target("rollback", "old key is what holders load"),
                intent=_target_intent,
                each_target=True,
            ),
            # 3. Deactivate the new credential if it may exist (found by its public key).
            Action(
                R,
                "deactivate_new",
                _deactivate_new,
                plan=_plan_deactivate_new,
                when=_recorded(F, "register_new"),
                done=_deactivated_new,
            ),
            # 4. Prove the old key, as the targets hold it, signs again; the holders use it.
            Action(R, "prove_old", _prove_old, plan=_plan_prove(staged=False)),
            _holders("old"),
        ],
        finish=_finish_rollback,
    ),
}


# ------------------------------------------------------------------------------ the kind


class SigningKeyKind(Kind):
    """Service-account keys (``service_account``) and PAT keys (``pat``)."""

    config_model = SigningKeyConfig
    data_model = SigningKeyData
    material = "signing_key"
    signs_requests = True
    steps = STEPS

    def __init__(self, name: str, title: str, description: str, *, endpoint_allowed: bool) -> None:
        self.name = name  # type: ignore[misc]
        #: What its refusals call it ("a PAT").
        self.title = title
        self.description = description  # type: ignore[misc]
        self._endpoint_allowed = endpoint_allowed

    def check_config(
        self, name: str, config: CredentialConfig, signers: Collection[str]
    ) -> str | None:
        assert isinstance(config, SigningKeyConfig)
        if not self._endpoint_allowed and config.registration != "credentials":
            return (
                f"key credentials.{name}.registration: a {self.title} registers keys with "
                '"credentials" (Create Credential on its linked user)'
            )
        return None

    def options(self, config: CredentialConfig) -> dict[str, Any]:
        assert isinstance(config, SigningKeyConfig)
        return {"algorithm": config.algorithm, "via": config.registration}

    def start(self, credential: ManagedCredential, options: Mapping[str, Any]) -> SigningKeyData:
        if credential.key_ref is None:
            raise KeyturnError(
                f"credential {credential.name} has no private key stored; import it with "
                "`keyturn credentials import` first"
            )
        via = str(options.get("via", "credentials"))
        if not self._endpoint_allowed and via != "credentials":
            raise KeyturnError(
                f"credential {credential.name} is a {self.title}: its keys are registered on the "
                'linked user with Create Credential; set registration = "credentials"'
            )
        algorithm = str(options.get("algorithm", "ed25519"))
        if algorithm not in ALGORITHMS:
            raise KeyturnError(f"algorithm {algorithm!r} is not known; use {', '.join(ALGORITHMS)}")
        return SigningKeyData(
            old_credential_id=credential.credential_id,
            old_credential_uuid=credential.credential_uuid,
            old_key_ref=credential.key_ref,
            old_algorithm=credential.algorithm,
            algorithm=algorithm,
            via=via,
        )

    def retained(self, data: Any) -> Sequence[str]:
        return [data.old_key_ref]

    def identities(self, data: Any) -> dict[str, str | None]:
        return {
            "old_credential_uuid": data.old_credential_uuid,
            "new_credential_uuid": data.new_credential_uuid,
        }

    async def open_session(self, services: Services, rotation: Rotation, fence: FenceFn) -> Any:
        return await services.provider_session(dfns_key_session, rotation.credential, fence=fence)

    def imported(
        self, name: str, config: CredentialConfig, material: bytes, services: Services
    ) -> str:
        return services.algorithm_of(material)

    async def reconcile(self, services: Services, item: ReconcileInput) -> list[Finding]:
        return await reconcile_signing_key(services, item)

    async def verify_import(
        self, access: ProviderAccess, credential_id: str, credential_uuid: str, material: bytes
    ) -> None:
        session = dfns_key_session(access)
        try:
            listed = await session.list_credentials()
            found = _by_uuid(listed, credential_uuid)
            if found is None:
                raise KeyturnError(
                    f"credential {credential_uuid} does not exist at the provider for this "
                    "token; check --credential-uuid (and that the token is this principal's)"
                )
            if found.credential_id != credential_id:
                raise KeyturnError(
                    f"credential {credential_uuid} has credential id {found.credential_id}, not "
                    f"{credential_id}; check --credential-id"
                )
            if not found.is_active:
                raise KeyturnError(
                    f"credential {credential_uuid} is inactive at the provider; import the "
                    "active one"
                )
            try:
                await session.prove(signer=SigningKey(credential_id, material))
            except KeyturnError as exc:
                raise KeyturnError(
                    f"the private key does not sign for credential {credential_uuid} ({exc}); "
                    "check --private-key-file"
                ) from None
        finally:
            await session.aclose()


# ------------------------------------------------------------------------------ reconcile


_CREATED_BY = re.compile(r"^(?:keyturn-|kt-)(rot_[A-Za-z0-9]+)$")


def created_by(c: ProviderCredential) -> str | None:
    """The rotation id a provider credential was created by, if keyturn created it (named
    ``keyturn-<rotation id>``, credId ``kt-<rotation id>``)."""
    for text in (c.name, c.credential_id):
        m = _CREATED_BY.match(text or "")
        if m:
            return m.group(1)
    return None


async def reconcile_signing_key(services: Services, item: ReconcileInput) -> list[Finding]:
    managed = item.managed
    name = managed.name
    try:
        provider = await services.provider_session(dfns_key_session, name)
        try:
            creds = await provider.list_credentials()
        finally:
            await provider.aclose()
    except KeyturnError as exc:
        return [Finding("unreachable", name, f"cannot list credentials: {exc}")]
    findings: list[Finding] = []
    by_uuid = {c.credential_uuid: c for c in creds}
    rotations = {r.id: r for r in item.rotations}
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
                    f"credential {c.credential_uuid} was created by rotation {rid}, which this "
                    "store does not know",
                    rid,
                    c.credential_uuid,
                )
            )
            continue
        recorded = rotation.data.get("new_credential_uuid")
        registering = not rotation.finished and not any(
            a.phase is F and a.name == "register_new" and a.status.value == "done"
            for a in item.actions.get(rid, ())
        )
        if recorded != c.credential_uuid and not registering:
            findings.append(
                Finding(
                    "orphan",
                    name,
                    f"credential {c.credential_uuid} was created by rotation {rid}, which "
                    f"recorded {recorded or 'no credential'} (a duplicate)",
                    rid,
                    c.credential_uuid,
                )
            )
    in_flight = any(not r.finished for r in item.rotations)
    current = by_uuid.get(managed.credential_uuid)
    if current is None:
        findings.append(
            Finding(
                "mismatch",
                name,
                f"the current credential {managed.credential_uuid} does not exist at the provider",
                provider_credential_uuid=managed.credential_uuid,
            )
        )
    elif not current.is_active and not in_flight:
        findings.append(
            Finding(
                "mismatch",
                name,
                f"the current credential {managed.credential_uuid} is inactive at the provider",
                provider_credential_uuid=managed.credential_uuid,
            )
        )
    latest = max(item.rotations, key=lambda r: r.created_at, default=None)
    if latest is not None:
        findings.extend(_check_latest(name, latest, by_uuid))
    findings.extend(_unaccounted(item, creds))
    return findings


def _unaccounted(item: ReconcileInput, creds: Sequence[ProviderCredential]) -> list[Finding]:
    """Active signing keys on the managed principal that keyturn does not account for: added
    by hand, by another tool, or by an attacker. A user's passkeys (Fido2) are the user's."""
    accounted = {item.managed.credential_uuid}
    for r in item.rotations:
        if not r.finished:
            accounted |= {
                str(r.data.get("old_credential_uuid")),
                str(r.data.get("new_credential_uuid")),
            }
    return [
        Finding(
            "unaccounted",
            item.managed.name,
            f"credential {c.credential_uuid} ({c.name or 'unnamed'}) is an active {c.kind} key "
            "on this principal that keyturn neither manages nor is rotating; deactivate it at "
            "the provider if nobody should sign with it",
            provider_credential_uuid=c.credential_uuid,
        )
        for c in creds
        if c.is_active and c.kind != "Fido2" and c.credential_uuid not in accounted
    ]


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


def _cred_detail(c: ProviderCredential) -> Detail:
    return {
        "credential_id": c.credential_id,
        "credential_uuid": c.credential_uuid,
        "is_active": c.is_active,
    }


def _find(
    creds: Sequence[ProviderCredential], public_pem: str, credential_id: str
) -> ProviderCredential | None:
    for c in creds:
        if c.credential_id == credential_id or _norm(c.public_key) == _norm(public_pem):
            return c
    return None


def _by_uuid(creds: Sequence[ProviderCredential], uuid: str) -> ProviderCredential | None:
    return next((c for c in creds if c.credential_uuid == uuid), None)


SERVICE_ACCOUNT = SigningKeyKind(
    "service_account",
    "service account",
    "Dfns service-account signing keys (the access token stays; the key rotates)",
    endpoint_allowed=True,
)
PAT = SigningKeyKind(
    "pat",
    "PAT",
    "Dfns personal-access-token keys (registered on the PAT's linked user)",
    endpoint_allowed=False,
)
