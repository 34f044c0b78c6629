"""Webhook-secret rotation. A webhook's secret cannot be changed, so a second webhook replaces
the first, ordered so that no event is ever signed with a secret the receiver does not hold:

- add_new: create a webhook with the old one's URL and events, DISABLED, its description
  carrying the rotation id; its secret is sealed and stored with the outcome -> new_added.
  A webhook whose secret was lost in a crash (intent, no outcome) is deleted and created again.
- verify: deploy both secrets to every receiver store, confirm every probed receiver has loaded
  them, enable the new webhook, ping it and require a 200 -> verified.
- deactivate_old: delete the old webhook (irreversible from its intent on), wait a grace period
  for deliveries in flight, deploy the new secret alone -> old_deactivated.
- rollback (before the delete): delete the new webhook, wait the grace period, deploy the old
  secret alone -> rolled_back.
"""

from __future__ import annotations

import asyncio
import time
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
from keyturn.engine.run import Detail, Outcome, RotationRun, new_secret_id
from keyturn.ports import Change, WebhookProvider

F, R = Phase.FORWARD, Phase.ROLLBACK
#: How long verification waits for every receiver to report the new secrets version.
CONFIRM_SECONDS = 15.0
#: How long the old webhook may take to deliver its backlog before the delete is postponed.
DRAIN_SECONDS = 60.0


def description_for(rotation_id: str) -> str:
    return f"keyturn rotation {rotation_id}"


class WebhookKind:
    kind = CredentialKind.WEBHOOK
    steps: Mapping[Trigger, Sequence[tuple[Phase, str]]] = {
        Trigger.ADD_NEW: [(F, "create_new")],
        Trigger.VERIFY: [
            (F, "deploy_both"),
            (F, "confirm_loaded"),
            (F, "enable_new"),
            (F, "ping_new"),
        ],
        Trigger.DEACTIVATE_OLD: [(F, "delete_old"), (F, "deploy_new_only")],
        Trigger.FINISH_ROLLBACK: [(R, "delete_new"), (R, "deploy_old_only")],
    }
    irreversible_actions: frozenset[tuple[Phase, str]] = frozenset({(F, "delete_old")})

    def initial_data(
        self, credential: ManagedCredential, options: Mapping[str, Any]
    ) -> dict[str, Any]:
        if credential.key_ref is None:
            raise KeyturnError(f"webhook {credential.name} has no stored secret to rotate from")
        return {"old_webhook_id": credential.credential_id, "old_secret_ref": credential.key_ref}

    def irreversible_reason(
        self, rotation: Rotation, actions: Sequence[ActionRecord]
    ) -> str | None:
        reason = irreversible_reason(self.irreversible_actions, actions)
        if reason:
            return f"{reason}: the old webhook is being or has been deleted, and a deleted " + (
                "webhook cannot be restored"
            )
        return None

    async def run_step(self, run: RotationRun, trigger: Trigger) -> None:
        session = run.deps.webhooks_for(run.rotation.credential, fence=run.fence)
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

    # ------------------------------------------------------------------ steps

    async def _add_new(self, run: RotationRun, provider: WebhookProvider) -> None:
        data = run.rotation.data
        rid = run.rotation.id
        if "url" not in data:
            old = await provider.get_webhook(data["old_webhook_id"])
            if old is None:
                raise StepError(
                    f"the old webhook {data['old_webhook_id']} no longer exists at the provider; "
                    "nothing to rotate (cancel this rotation)",
                    retryable=False,
                )
            await run.commit(
                Change(
                    rid, 0, updates={"data": {**data, "url": old.url, "events": list(old.events)}}
                ),
                defer=True,
            )
            data = run.rotation.data

        async def call() -> Outcome:
            info, secret = await provider.create_webhook(
                url=data["url"],
                events=data["events"],
                description=description_for(rid),
                enabled=False,
            )
            ref = new_secret_id()
            sealed = run.deps.vault.seal(ref, "webhook_secret", secret.encode())
            return Outcome(
                {"webhook_id": info.id, "status": info.status},
                secrets=(sealed,),
                data={"new_webhook_id": info.id, "new_secret_ref": ref},
            )

        async def reconcile() -> Detail | None:
            # An intent without an outcome: a webhook may exist whose secret was never stored.
            # It is disabled (no event was signed with it): delete it and create anew.
            for w in await provider.list_webhooks():
                if w.description == description_for(rid):
                    await provider.delete_webhook(w.id)
            return None

        detail = await run.external(
            F, "create_new", call, reconcile, intent={"url": data["url"], "events": data["events"]}
        )
        await run.transition(
            Trigger.ADD_NEW, detail={"new_webhook_id": detail["webhook_id"]}, defer=True
        )

    async def _verify(self, run: RotationRun, provider: WebhookProvider) -> None:
        data = run.rotation.data
        new_id = data["new_webhook_id"]
        old_secret, new_secret = await self._secrets(run)
        version = await self._deploy(run, F, "deploy_both", [old_secret, new_secret])
        await self._confirm(run, F, "confirm_loaded", version)

        async def enable() -> Detail:
            await provider.set_enabled(new_id, True)
            return {"webhook_id": new_id, "status": "Enabled"}

        async def enabled() -> Detail | None:
            w = await provider.get_webhook(new_id)
            return (
                {"webhook_id": new_id, "status": "Enabled"} if w and w.status == "Enabled" else None
            )

        await run.external(F, "enable_new", enable, enabled)

        async def ping() -> Detail:
            status = await provider.ping(new_id)
            if status != "200":
                raise StepError(
                    f"ping of the new webhook {new_id} got status {status} from the receiver, "
                    "not 200; check that the receiver is up and has loaded the new secret",
                    retryable=True,
                )
            return {"webhook_id": new_id, "status": status}

        await run.external(F, "ping_new", ping)
        await run.transition(Trigger.VERIFY, detail={"secrets_version": version}, defer=True)

    async def _deactivate_old(self, run: RotationRun, provider: WebhookProvider) -> None:
        data = run.rotation.data
        old_id = data["old_webhook_id"]

        async def delete() -> Detail:
            await provider.delete_webhook(old_id)
            return {"webhook_id": old_id, "deleted": True}

        async def gone() -> Detail | None:
            return (
                None
                if await provider.get_webhook(old_id)
                else {"webhook_id": old_id, "deleted": True}
            )

        if await run.action(F, "delete_old") is None:
            await self._drain_old(run, provider)
        await run.external(F, "delete_old", delete, gone)
        await self._grace(run, F, "delete_old")
        _, new_secret = await self._secrets(run)
        await self._deploy(run, F, "deploy_new_only", [new_secret])
        credential = await run.credential()
        now = run.now()
        await run.transition(
            Trigger.DEACTIVATE_OLD,
            defer=True,
            extra=Change(
                run.rotation.id,
                0,
                credential=replace(
                    credential,
                    credential_id=data["new_webhook_id"],
                    credential_uuid=data["new_webhook_id"],
                    key_ref=data["new_secret_ref"],
                    updated_at=now,
                ),
                purge_after={data["old_secret_ref"]: now + run.deps.settings.retention},
            ),
        )

    async def _rollback(self, run: RotationRun, provider: WebhookProvider) -> None:
        data = run.rotation.data
        rid = run.rotation.id
        if await run.action(F, "create_new") is not None:

            async def delete_new() -> Detail:
                deleted = []
                for w in await provider.list_webhooks():
                    if w.description == description_for(rid) or w.id == data.get("new_webhook_id"):
                        await provider.delete_webhook(w.id)
                        deleted.append(w.id)
                return {"deleted": deleted}

            await run.external(R, "delete_new", delete_new)
            await self._grace(run, R, "delete_new")
        old_secret = run.deps.vault.open(await run.secret(data["old_secret_ref"]))
        await self._deploy(run, R, "deploy_old_only", [old_secret.decode()])
        purge: dict[str, datetime | None] = {}
        if "new_secret_ref" in data:
            purge[data["new_secret_ref"]] = run.now() + run.deps.settings.retention
        await run.transition(
            Trigger.FINISH_ROLLBACK, extra=Change(run.rotation.id, 0, purge_after=purge), defer=True
        )

    # ------------------------------------------------------------------ shared

    async def _secrets(self, run: RotationRun) -> tuple[str, str]:
        data = run.rotation.data
        vault = run.deps.vault
        old = vault.open(await run.secret(data["old_secret_ref"])).decode()
        new = vault.open(await run.secret(data["new_secret_ref"])).decode()
        return old, new

    async def _deploy(self, run: RotationRun, phase: Phase, name: str, secrets: list[str]) -> str:
        targets = run.deps.secret_targets_for(run.rotation.credential)
        if not targets:
            raise StepError(
                f"webhook {run.rotation.credential} has no secrets target configured; add a "
                '[[credentials.NAME.targets]] with type = "secrets_file"',
                retryable=False,
            )

        async def call() -> Detail:
            versions = {}
            for t in targets:
                run.fence()
                versions[t.name] = t.deploy(secrets)
            return {"versions": versions, "count": len(secrets)}

        detail = await run.external(phase, name, call, intent={"count": len(secrets)})
        versions = set(detail["versions"].values())
        return str(next(iter(versions))) if len(versions) == 1 else ",".join(sorted(versions))

    async def _confirm(self, run: RotationRun, phase: Phase, name: str, version: str) -> None:
        probes = run.deps.probes_for(run.rotation.credential)

        async def call() -> Detail:
            deadline = time.monotonic() + CONFIRM_SECONDS
            pending = {p.name: p for p in probes}
            seen: dict[str, str | None] = {}
            while pending:
                for pname, probe in list(pending.items()):
                    try:
                        seen[pname] = await probe.loaded_version()
                    except KeyturnError as exc:  # not answering yet: keep asking until the deadline
                        seen[pname] = f"no answer ({exc})"
                    if seen[pname] == version:
                        del pending[pname]
                if not pending:
                    break
                if time.monotonic() > deadline:
                    report = ", ".join(f"{n} reports {seen.get(n)}" for n in pending)
                    raise StepError(
                        f"receivers have not loaded secrets version {version}: {report}",
                        retryable=True,
                    )
                await asyncio.sleep(0.2)
            return {"version": version, "probes": sorted(p.name for p in probes)}

        await run.external(phase, name, call)

    async def _drain_old(self, run: RotationRun, provider: WebhookProvider) -> None:
        """Before the old webhook is deleted, let it deliver what was queued for it alone: the
        events emitted before the new webhook was enabled. Deleting it earlier drops them. It
        has caught up once it delivered an event dated after the new webhook's enabling; a
        webhook whose deliveries stopped moving (no traffic) has nothing queued either."""
        enabled = await run.action(F, "enable_new")
        if enabled is None or enabled.outcome_at is None:
            return
        since = enabled.outcome_at
        old_id = run.rotation.data["old_webhook_id"]
        quiet = max(2.0, run.deps.grace_for(run.rotation.credential))
        started = last_move = time.monotonic()
        seen: datetime | None = None
        while True:
            await run.check_boundary()
            run.fence()
            latest = await provider.latest_delivery(old_id)
            now = time.monotonic()
            if latest is not None and latest >= since:
                return
            if latest != seen:
                seen, last_move = latest, now
            elif now - last_move >= quiet:
                return
            if now - started > DRAIN_SECONDS:
                raise StepError(
                    f"the old webhook {old_id} still has a delivery backlog (its newest delivered "
                    f"event is from {seen.isoformat() if seen else 'never'}, the new webhook was "
                    f"enabled at {since.isoformat()}); deleting it now would drop those events",
                    retryable=True,
                )
            await asyncio.sleep(0.5)

    async def _grace(self, run: RotationRun, phase: Phase, after: str) -> None:
        """Wait the grace period after `after`'s outcome, counted from its outcome time, so a
        resumed rotation only waits what is left."""
        record = await run.action(phase, after)
        grace = run.deps.grace_for(run.rotation.credential)
        if record is None or record.outcome_at is None or grace <= 0:
            return
        left = (record.outcome_at - run.now()).total_seconds() + grace
        while left > 0:
            await run.check_boundary()
            step = min(left, 1.0)
            await asyncio.sleep(step)
            left -= step


WEBHOOK = WebhookKind()
