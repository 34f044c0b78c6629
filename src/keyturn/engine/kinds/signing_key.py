"""Signing-key rotation (service accounts; PATs reuse it with their linked user's credentials).

Forward: generate and seal the new key -> register it, signed by the old key -> new_added;
deploy to every target, read back, prove a signature made with what was read back ->
verified; deactivate the old credential, signed by the new key -> old_deactivated.
Rollback undoes, in reverse, whatever the action records say happened.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from keyturn.domain.errors import KeyturnError, StepError
from keyturn.domain.lifecycle import Trigger
from keyturn.domain.model import (
    ActionRecord,
    CredentialKind,
    ManagedCredential,
    Phase,
    Rotation,
)
from keyturn.engine.kinds.base import dispatch, irreversible_reason
from keyturn.engine.run import Detail, RotationRun, new_secret_id
from keyturn.ports import (
    Change,
    DeployedMaterial,
    KeyProvider,
    ProviderCredential,
    SigningKey,
)

F, R = Phase.FORWARD, Phase.ROLLBACK


def fingerprint(public_pem: str) -> str:
    """A short, non-secret identifier of a public key, for logs and records."""
    return hashlib.sha256(_norm(public_pem).encode()).hexdigest()[:16]


def _norm(pem: str) -> str:
    return "".join(pem.split())


class SigningKeyKind:
    """Service-account keys, and PAT keys (registered on the PAT's linked user; the holders get
    the new private key and the new credential id together, in one deployment)."""

    def __init__(self, kind: CredentialKind) -> None:
        self.kind = kind

    #: No action of a signing-key rotation is irreversible: an old key can be reactivated.
    irreversible_actions: frozenset[tuple[Phase, str]] = frozenset()
    steps: Mapping[Trigger, Sequence[tuple[Phase, str]]] = {
        Trigger.ADD_NEW: [(F, "register_new")],
        Trigger.VERIFY: [(F, "deploy_new"), (F, "prove_new")],
        Trigger.DEACTIVATE_OLD: [(F, "deactivate_old")],
        Trigger.FINISH_ROLLBACK: [
            (R, "reactivate_old"),
            (R, "redeploy_old"),
            (R, "deactivate_new"),
            (R, "prove_old"),
        ],
    }

    def initial_data(
        self, credential: ManagedCredential, options: Mapping[str, Any]
    ) -> dict[str, Any]:
        if credential.key_ref is None:
            raise KeyturnError(
                f"credential {credential.name} has no private key stored; import it with "
                "`keyturn credentials import` first"
            )
        via = str(options.get("via", "credentials"))
        if self.kind is CredentialKind.PAT and via != "credentials":
            raise KeyturnError(
                f"credential {credential.name} is a PAT: its keys are registered on the linked "
                'user with Create Credential; set registration = "credentials"'
            )
        return {
            "old_credential_id": credential.credential_id,
            "old_credential_uuid": credential.credential_uuid,
            "old_key_ref": credential.key_ref,
            "old_algorithm": credential.algorithm,
            "algorithm": str(options.get("algorithm", "ed25519")),
            "via": via,
        }

    def irreversible_reason(
        self, rotation: Rotation, actions: Sequence[ActionRecord]
    ) -> str | None:
        return irreversible_reason(self.irreversible_actions, actions)

    # ------------------------------------------------------------------ steps

    async def run_step(self, run: RotationRun, trigger: Trigger) -> None:
        session = run.deps.provider_for(run.rotation.credential, fence=run.fence)
        await dispatch(
            run,
            trigger,
            session,
            {
                Trigger.ADD_NEW: self._add_new,
                Trigger.VERIFY: self._verify,
                Trigger.DEACTIVATE_OLD: self._deactivate_old,
                Trigger.FINISH_ROLLBACK: self._rollback,
            },
        )

    async def _add_new(self, run: RotationRun, provider: KeyProvider) -> None:
        data = run.rotation.data
        if "new_key_ref" not in data:
            # Secret material keyturn generates is sealed and committed before the provider
            # hears of it, so a crash after the call never orphans a credential.
            key = run.deps.keys.generate(data["algorithm"])
            secret_id = new_secret_id()
            sealed = run.deps.vault.seal(secret_id, "private_key", key.private_pem)
            new_cred_id = f"kt-{run.rotation.id}"
            await run.commit(
                Change(
                    run.rotation.id,
                    0,
                    updates={
                        "data": {
                            **data,
                            "new_key_ref": secret_id,
                            "new_public_key": key.public_pem,
                            "new_fingerprint": fingerprint(key.public_pem),
                            "new_credential_id": new_cred_id,
                        }
                    },
                    secrets=[sealed],
                ),
                defer=True,  # written with the intent to register it, before the call
            )
            data = run.rotation.data
        old = await self._signing_key(run, "old")
        new = await self._signing_key(run, "new")
        public_pem = data["new_public_key"]

        async def call() -> Detail:
            created = await provider.register_key(
                signer=old, new_key=new, name=f"keyturn-{run.rotation.id}", via=data["via"]
            )
            return _cred_detail(created)

        async def reconcile() -> Detail | None:
            found = _find(await provider.list_credentials(), public_pem, new.credential_id)
            return _cred_detail(found) if found else None

        detail = await run.external(
            F,
            "register_new",
            call,
            reconcile,
            intent={"fingerprint": data["new_fingerprint"], "via": data["via"]},
        )
        await run.transition(
            Trigger.ADD_NEW,
            defer=True,
            detail={"new_credential_uuid": detail["credential_uuid"]},
            extra=Change(
                run.rotation.id,
                0,
                updates={
                    "data": {
                        **run.rotation.data,
                        "new_credential_id": detail["credential_id"],
                        "new_credential_uuid": detail["credential_uuid"],
                    }
                },
            ),
        )

    async def _verify(self, run: RotationRun, provider: KeyProvider) -> None:
        data = run.rotation.data
        new = await self._signing_key(run, "new")
        material = DeployedMaterial(
            new.private_key_pem, data["new_credential_id"], data["new_credential_uuid"]
        )
        await self._deploy(run, F, "deploy_new", material, data["new_fingerprint"])
        await self._prove(run, provider, F, "prove_new", material, data["new_public_key"])
        await run.transition(Trigger.VERIFY, defer=True)

    async def _deactivate_old(self, run: RotationRun, provider: KeyProvider) -> None:
        data = run.rotation.data
        new = await self._signing_key(run, "new")
        old_uuid = data["old_credential_uuid"]

        async def call() -> Detail:
            await provider.deactivate(signer=new, credential_uuid=old_uuid)
            return {"credential_uuid": old_uuid, "is_active": False}

        async def reconcile() -> Detail | None:
            old = _by_uuid(await provider.list_credentials(), old_uuid)
            if old is not None and not old.is_active:
                return {"credential_uuid": old_uuid, "is_active": False}
            return None

        await run.external(
            F, "deactivate_old", call, reconcile, intent={"credential_uuid": old_uuid}
        )
        now = run.now()
        await self._finish(
            run,
            Trigger.DEACTIVATE_OLD,
            side="new",
            purge_after={data["old_key_ref"]: now + run.deps.settings.retention},
        )

    async def _rollback(self, run: RotationRun, provider: KeyProvider) -> None:
        data = run.rotation.data
        old_uuid = data["old_credential_uuid"]
        old = await self._signing_key(run, "old")

        # 1. Reactivate the old credential if a deactivation may have happened.
        if await run.action(F, "deactivate_old") is not None:
            new = await self._signing_key(run, "new")

            async def reactivate() -> Detail:
                current = _by_uuid(await provider.list_credentials(), old_uuid)
                if current is None or not current.is_active:
                    await provider.activate(signer=new, credential_uuid=old_uuid)
                return {"credential_uuid": old_uuid, "is_active": True}

            await run.external(
                R, "reactivate_old", reactivate, intent={"credential_uuid": old_uuid}
            )

        # 2. Put the old key back on every target (idempotent; done even if the new key never
        #    reached them, so the targets end up holding exactly the old key).
        material = DeployedMaterial(old.private_key_pem, data["old_credential_id"], old_uuid)
        old_public = run.deps.keys.public_pem(old.private_key_pem)
        await self._deploy(run, R, "redeploy_old", material, fingerprint(old_public))

        # 3. Deactivate the new credential if it may exist (reconciled by its public key).
        if await run.action(F, "register_new") is not None:
            new_public = data["new_public_key"]
            new_cred_id = data.get("new_credential_id", "")

            async def deactivate_new() -> Detail:
                found = _find(await provider.list_credentials(), new_public, new_cred_id)
                if found is None:
                    return {"found": False}
                if found.is_active:
                    await provider.deactivate(signer=old, credential_uuid=found.credential_uuid)
                return {"found": True, "credential_uuid": found.credential_uuid, "is_active": False}

            found = await run.external(R, "deactivate_new", deactivate_new)
            if found.get("found") and "new_credential_uuid" not in data:
                # adopted after an unknown outcome: record which credential it was
                data = {**data, "new_credential_uuid": found["credential_uuid"]}

        # 4. Prove the old key, as the targets hold it, signs again.
        await self._prove(run, provider, R, "prove_old", material, old_public)

        now = run.now()
        purge: dict[str, datetime | None] = {data["old_key_ref"]: None}
        if "new_key_ref" in data:
            purge[data["new_key_ref"]] = now + run.deps.settings.retention
        await self._finish(run, Trigger.FINISH_ROLLBACK, side="old", purge_after=purge, data=data)

    async def _finish(
        self,
        run: RotationRun,
        trigger: Trigger,
        *,
        side: str,
        purge_after: dict[str, datetime | None],
        data: dict[str, Any] | None = None,
    ) -> None:
        """The final transition: the managed credential points at the `side` key from now on,
        in the same transaction, and key retention is scheduled."""
        data = data if data is not None else run.rotation.data
        algorithm = data["algorithm"] if side == "new" else data["old_algorithm"]
        credential = await run.credential()
        await run.transition(
            trigger,
            defer=True,
            extra=Change(
                run.rotation.id,
                0,
                credential=replace(
                    credential,
                    credential_id=data[f"{side}_credential_id"],
                    credential_uuid=data[f"{side}_credential_uuid"],
                    key_ref=data[f"{side}_key_ref"],
                    algorithm=algorithm,
                    updated_at=run.now(),
                ),
                purge_after=purge_after,
                updates={"data": data},
            ),
        )

    # ------------------------------------------------------------------ shared actions

    async def _deploy(
        self, run: RotationRun, phase: Phase, name: str, material: DeployedMaterial, fp: str
    ) -> None:
        targets = run.deps.targets_for(run.rotation.credential)

        async def call() -> Detail:
            for target in targets:
                run.fence()
                target.deploy(material)
            return {"targets": [t.name for t in targets], "fingerprint": fp}

        # Deploying is idempotent: after an unknown outcome it is simply done again.
        await run.external(phase, name, call, intent={"targets": [t.name for t in targets]})

    async def _prove(
        self,
        run: RotationRun,
        provider: KeyProvider,
        phase: Phase,
        name: str,
        expected: DeployedMaterial,
        public_pem: str,
    ) -> None:
        targets = run.deps.targets_for(run.rotation.credential)
        keys = run.deps.keys

        async def call() -> Detail:
            proved = []
            for target in targets:
                try:
                    held = target.read_back()
                except KeyturnError as exc:
                    raise StepError(f"target {target.name}: {exc}", retryable=True) from exc
                # The bytes keyturn deployed are the expected key (no parse needed); anything
                # else must at least be the same key.
                same_key = held.private_key_pem == expected.private_key_pem or _norm(
                    keys.public_pem(held.private_key_pem)
                ) == _norm(public_pem)
                if not same_key or (
                    held.credential_id != expected.credential_id
                    or held.credential_uuid != expected.credential_uuid
                ):
                    raise StepError(
                        f"target {target.name} does not hold the expected key and credential "
                        f"id (expected key {fingerprint(public_pem)}, "
                        f"credential {expected.credential_id})",
                        retryable=True,
                    )
                # Prove with what the target holds, not with keyturn's own copy.
                await provider.prove(signer=SigningKey(held.credential_id, held.private_key_pem))
                proved.append(target.name)
            if not targets:
                await provider.prove(
                    signer=SigningKey(expected.credential_id, expected.private_key_pem)
                )
            return {"targets": proved, "fingerprint": fingerprint(public_pem)}

        await run.external(phase, name, call)

    async def _signing_key(self, run: RotationRun, which: str) -> SigningKey:
        data = run.rotation.data
        sealed = await run.secret(data[f"{which}_key_ref"])
        pem = run.deps.vault.open(sealed)
        return SigningKey(data[f"{which}_credential_id"], pem)


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


SERVICE_ACCOUNT = SigningKeyKind(CredentialKind.SERVICE_ACCOUNT)
PAT = SigningKeyKind(CredentialKind.PAT)
