"""Webhook-secret rotation. A webhook's secret cannot be changed, so a second webhook replaces
the first, ordered so that no event is ever signed with a secret the receiver does not hold:

- add_new: create a webhook with the old one's URL and events, DISABLED, its description
  carrying the rotation id; its secret is sealed and stored with the outcome -> new_added.
  A webhook whose secret was lost in a crash (intent, no outcome) is deleted and created again.
- verify: deploy both secrets to every receiver store, wait until every probed receiver has
  loaded them, enable the new webhook, ping it and require a 200 -> verified.
- deactivate_old: let the old webhook deliver its backlog, delete it (irreversible from its
  intent on), wait a grace period for deliveries in flight, deploy the new secret alone ->
  old_deactivated.
- rollback (before the delete): delete the new webhook, wait the grace period, deploy the old
  secret alone -> rolled_back.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

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
    Outcome,
    Phase,
    R,
    ReconcileInput,
    Rotation,
    RotationData,
    Services,
    Step,
    StepContext,
    StepError,
    Trigger,
    Wait,
    WebhookInfo,
    WebhookProvider,
    dfns_webhook_session,
)

#: How long the old webhook may take to deliver its backlog before the delete is postponed.
DRAIN_SECONDS = 60.0
#: How often a waiting rotation checks again that its receivers have loaded the secrets.
CONFIRM_EVERY_SECONDS = 0.5


class WebhookConfig(CredentialConfig):
    #: The managed credential (service account or PAT) whose token and current key sign the
    #: webhook calls.
    signer: str | None = None
    #: The wait after removing a webhook, for deliveries in flight.
    grace_seconds: float = Field(default=5.0, ge=0)
    #: How long verification waits for every probed receiver to load the new secrets.
    confirm_timeout_seconds: float = Field(default=600.0, gt=0)


class WebhookData(RotationData):
    old_webhook_id: str
    old_secret_ref: str
    url: str | None = None
    events: list[str] | None = None
    new_webhook_id: str | None = None
    new_secret_ref: str | None = None


Ctx = StepContext[WebhookData, WebhookProvider]


def description_for(rotation_id: str) -> str:
    return f"keyturn rotation {rotation_id}"


def _cfg(ctx: Ctx) -> WebhookConfig:
    assert isinstance(ctx.config, WebhookConfig)
    return ctx.config


def _new_id(ctx: Ctx) -> str:
    if ctx.data.new_webhook_id is None:
        raise KeyturnError("the rotation data has no new webhook id")
    return ctx.data.new_webhook_id


# ------------------------------------------------------------------------------ add_new


async def _learn_old(ctx: Ctx) -> None:
    if ctx.data.url is not None:
        return
    old = await ctx.session.get_webhook(ctx.data.old_webhook_id)
    if old is None:
        raise StepError(
            f"the old webhook {ctx.data.old_webhook_id} no longer exists at the provider; "
            "nothing to rotate (cancel this rotation)",
            retryable=False,
        )
    ctx.update(url=old.url, events=list(old.events))


async def _create(ctx: Ctx) -> Outcome:
    info, secret = await ctx.session.create_webhook(
        url=ctx.data.url or "",
        events=ctx.data.events or [],
        description=description_for(ctx.rotation.id),
        enabled=False,
    )
    sealed = ctx.seal("webhook_secret", secret.encode())
    return Outcome(
        {"webhook_id": info.id, "status": info.status, "secret_ref": sealed},
        secrets=tuple(ctx.take_sealed()),
    )


async def _forget_unsecreted(ctx: Ctx) -> Detail | None:
    # An intent without an outcome: a webhook may exist whose secret was never stored. It is
    # disabled (no event was signed with it): delete it and create anew.
    for w in await ctx.session.list_webhooks():
        if w.description == description_for(ctx.rotation.id):
            await ctx.session.delete_webhook(w.id)
    return None


def _created(ctx: Ctx, detail: Detail) -> None:
    ctx.update(new_webhook_id=detail["webhook_id"], new_secret_ref=detail["secret_ref"])


def _plan_create(facts: Facts) -> list[Call]:
    calls = [] if facts.data.url is not None else [Call.provider("GET", "/webhooks/{webhookId}")]
    return [*calls, Call.provider("POST", "/webhooks", signed=True, note="new webhook, disabled")]


# ------------------------------------------------------------------------------ verify


async def _secrets(ctx: Ctx) -> tuple[str, str]:
    old = (await ctx.open(ctx.data.old_secret_ref)).decode()
    if ctx.data.new_secret_ref is None:
        raise KeyturnError("the rotation data has no new secret")
    return old, (await ctx.open(ctx.data.new_secret_ref)).decode()


async def _deploy(ctx: Ctx, secrets: list[str]) -> Detail:
    targets = ctx.targets
    if not targets:
        raise StepError(
            f"webhook {ctx.rotation.credential} has no secrets target configured; add a "
            '[[credentials.NAME.targets]] with type = "secrets_file"',
            retryable=False,
        )
    versions = {}
    for t in targets:
        ctx.fence()
        versions[t.name] = await t.deploy(secrets)
    return {"versions": versions, "count": len(secrets)}


def _version(detail: Detail) -> str:
    versions = set(detail["versions"].values())
    return str(next(iter(versions))) if len(versions) == 1 else ",".join(sorted(versions))


async def _deploy_both(ctx: Ctx) -> Detail:
    return await _deploy(ctx, list(await _secrets(ctx)))


async def _deployed_version(ctx: Ctx) -> str:
    record = await ctx.record(F, "deploy_both")
    if record is None:
        raise KeyturnError("both secrets were never deployed")
    return _version(record.detail)


async def _unconfirmed(ctx: Ctx) -> str | None:
    version = await _deployed_version(ctx)
    behind = []
    for probe in ctx.probes:
        try:
            seen = await probe.loaded_version()
        except KeyturnError as exc:  # not answering yet: keep asking until the deadline
            seen = f"no answer ({exc})"
        if seen != version:
            behind.append(f"{probe.name} reports {seen}")
    if not behind:
        return None
    return f"receivers to load secrets version {version} ({', '.join(behind)})"


async def _enable(ctx: Ctx) -> Detail:
    await ctx.session.set_enabled(_new_id(ctx), True)
    return {"webhook_id": _new_id(ctx), "status": "Enabled"}


async def _enabled(ctx: Ctx) -> Detail | None:
    w = await ctx.session.get_webhook(_new_id(ctx))
    return (
        {"webhook_id": _new_id(ctx), "status": "Enabled"} if w and w.status == "Enabled" else None
    )


async def _ping(ctx: Ctx) -> Detail:
    new_id = _new_id(ctx)
    status = await ctx.session.ping(new_id)
    if status != "200":
        raise StepError(
            f"ping of the new webhook {new_id} got status {status} from the receiver, not 200; "
            "check that the receiver is up and has loaded the new secret",
            retryable=True,
        )
    return {"webhook_id": new_id, "status": status}


async def _finish_verify(ctx: Ctx) -> Finish:
    return Finish(detail={"secrets_version": await _deployed_version(ctx)})


def _plan_targets(note: str) -> Any:
    return lambda facts: [Call.target(t, "deploy", note=note) for t in facts.targets]


# ------------------------------------------------------------------------------ deactivate_old


async def _drain_old(ctx: Ctx) -> None:
    """Before the old webhook is deleted, let it deliver what was queued for it alone: the
    events emitted before the new webhook was enabled. Deleting it earlier drops them. It has
    caught up once it delivered an event dated after the new webhook's enabling; a webhook
    whose deliveries stopped moving (no traffic) has nothing queued either."""
    if await ctx.record(F, "delete_old") is not None:
        return
    enabled = await ctx.record(F, "enable_new")
    if enabled is None or enabled.outcome_at is None:
        return
    since = enabled.outcome_at
    old_id = ctx.data.old_webhook_id
    quiet = max(2.0, _cfg(ctx).grace_seconds)
    started = last_move = time.monotonic()
    seen: datetime | None = None
    while True:
        await ctx.check_boundary()
        ctx.fence()
        latest = await ctx.session.latest_delivery(old_id)
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


async def _delete_old(ctx: Ctx) -> Detail:
    await ctx.session.delete_webhook(ctx.data.old_webhook_id)
    return {"webhook_id": ctx.data.old_webhook_id, "deleted": True}


async def _old_gone(ctx: Ctx) -> Detail | None:
    old_id = ctx.data.old_webhook_id
    return (
        None if await ctx.session.get_webhook(old_id) else {"webhook_id": old_id, "deleted": True}
    )


def _grace(phase: Phase, after: str) -> Wait[Ctx]:
    """Wait the grace period after `after`'s outcome, counted from its outcome time, so a
    resumed rotation only waits what is left; the lease is not held meanwhile."""

    async def left(ctx: Ctx) -> float:
        record = await ctx.record(phase, after)
        if record is None or record.outcome_at is None:
            return 0.0
        return (record.outcome_at - ctx.now()).total_seconds() + _cfg(ctx).grace_seconds

    async def check(ctx: Ctx) -> str | None:
        remaining = await left(ctx)
        if remaining <= 0:
            return None
        return f"deliveries in flight after {after} ({_cfg(ctx).grace_seconds:g}s grace period)"

    return Wait(
        phase,
        f"grace_after_{after}",
        check,
        every=lambda ctx: min(_cfg(ctx).grace_seconds, 1.0),
        deadline=lambda ctx: _cfg(ctx).grace_seconds + 300.0,
        plan=lambda facts: [Call.wait(f"the grace period after {after}")],
        when=lambda facts: facts.recorded(phase, after),
    )


async def _deploy_new_only(ctx: Ctx) -> Detail:
    _, new = await _secrets(ctx)
    return await _deploy(ctx, [new])


async def _finish_forward(ctx: Ctx) -> Finish:
    credential = await ctx.credential()
    now = ctx.now()
    new_id = _new_id(ctx)
    return Finish(
        credential=replace(
            credential,
            credential_id=new_id,
            credential_uuid=new_id,
            key_ref=ctx.data.new_secret_ref,
            updated_at=now,
        ),
        purge_after={ctx.data.old_secret_ref: now + ctx.retention},
    )


# ------------------------------------------------------------------------------ rollback


async def _delete_new(ctx: Ctx) -> Detail:
    deleted = []
    for w in await ctx.session.list_webhooks():
        if w.description == description_for(ctx.rotation.id) or w.id == ctx.data.new_webhook_id:
            await ctx.session.delete_webhook(w.id)
            deleted.append(w.id)
    return {"deleted": deleted}


async def _deploy_old_only(ctx: Ctx) -> Detail:
    old = (await ctx.open(ctx.data.old_secret_ref)).decode()
    return await _deploy(ctx, [old])


async def _finish_rollback(ctx: Ctx) -> Finish:
    purge: dict[str, datetime | None] = {}
    if ctx.data.new_secret_ref is not None:
        purge[ctx.data.new_secret_ref] = ctx.now() + ctx.retention
    return Finish(purge_after=purge)


def _plan_probes(facts: Facts) -> list[Call]:
    return [Call.probe(p, "loaded_version", note="both secrets loaded") for p in facts.probes]


async def _finish_add_new(ctx: Ctx) -> Finish:
    """The add_new transition's event records the new side's id."""
    return Finish(detail={"new_webhook_id": ctx.data.new_webhook_id})


STEPS: Mapping[Trigger, Step[Ctx]] = {
    Trigger.ADD_NEW: Step(
        [
            Action(
                F,
                "create_new",
                _create,
                plan=_plan_create,
                prepare=_learn_old,
                reconcile=_forget_unsecreted,
                intent=lambda ctx: {"url": ctx.data.url, "events": ctx.data.events},
                done=_created,
            )
        ],
        finish=_finish_add_new,
    ),
    Trigger.VERIFY: Step(
        [
            Action(
                F,
                "deploy_both",
                _deploy_both,
                plan=_plan_targets("old and new secrets accepted"),
                intent=lambda _ctx: {"count": 2},
            ),
            Wait(
                F,
                "confirm_loaded",
                _unconfirmed,
                every=lambda _ctx: CONFIRM_EVERY_SECONDS,
                deadline=lambda ctx: _cfg(ctx).confirm_timeout_seconds,
                plan=_plan_probes,
            ),
            Action(
                F,
                "enable_new",
                _enable,
                plan=lambda _f: [
                    Call.provider(
                        "PUT", "/webhooks/{webhookId}", signed=True, note="new webhook enabled"
                    )
                ],
                reconcile=_enabled,
            ),
            Action(
                F,
                "ping_new",
                _ping,
                plan=lambda _f: [Call.provider("POST", "/webhooks/{webhookId}/ping", signed=True)],
            ),
        ],
        finish=_finish_verify,
    ),
    Trigger.DEACTIVATE_OLD: Step(
        [
            Action(
                F,
                "delete_old",
                _delete_old,
                plan=lambda _f: [
                    Call.poll("GET", "/webhooks/{webhookId}/events", note="old backlog delivered"),
                    Call.provider(
                        "DELETE", "/webhooks/{webhookId}", signed=True, note="old webhook deleted"
                    ),
                ],
                prepare=_drain_old,
                reconcile=_old_gone,
                irreversible=True,
            ),
            _grace(F, "delete_old"),
            Action(
                F,
                "deploy_new_only",
                _deploy_new_only,
                plan=_plan_targets("new secret only"),
                intent=lambda _ctx: {"count": 1},
            ),
        ],
        finish=_finish_forward,
    ),
    Trigger.FINISH_ROLLBACK: Step(
        [
            Action(
                R,
                "delete_new",
                _delete_new,
                plan=lambda _f: [
                    Call.provider("GET", "/webhooks"),
                    Call.provider(
                        "DELETE", "/webhooks/{webhookId}", signed=True, note="new webhook deleted"
                    ),
                ],
                when=lambda facts: facts.recorded(F, "create_new"),
            ),
            _grace(R, "delete_new"),
            Action(
                R,
                "deploy_old_only",
                _deploy_old_only,
                plan=_plan_targets("old secret only"),
                intent=lambda _ctx: {"count": 1},
            ),
        ],
        finish=_finish_rollback,
    ),
}


class WebhookKind(Kind):
    name = "webhook"
    description = "Dfns webhook secrets (a second webhook replaces the first)"
    config_model = WebhookConfig
    data_model = WebhookData
    material = "secret_set"
    import_spec = ImportSpec(
        material_option="--secret-file",
        material_purpose="webhook_secret",
        needs_uuid=False,
        needs_token=False,
        strip_material=True,
    )
    steps = STEPS

    def check_config(
        self, name: str, config: CredentialConfig, signers: Collection[str]
    ) -> str | None:
        assert isinstance(config, WebhookConfig)
        if config.signer not in signers:
            return (
                f"key credentials.{name}.signer: a webhook needs signer = the name of a "
                "service_account or pat credential configured here, whose key signs the "
                "webhook calls"
            )
        return None

    def signer(self, config: CredentialConfig) -> str | None:
        assert isinstance(config, WebhookConfig)
        return config.signer

    def start(self, credential: ManagedCredential, options: Mapping[str, Any]) -> WebhookData:
        if credential.key_ref is None:
            raise KeyturnError(f"webhook {credential.name} has no stored secret to rotate from")
        return WebhookData(
            old_webhook_id=credential.credential_id, old_secret_ref=credential.key_ref
        )

    def retained(self, data: Any) -> Sequence[str]:
        return [data.old_secret_ref]

    def identities(self, data: Any) -> dict[str, str | None]:
        ids = {"old_webhook_id": data.old_webhook_id}
        return (
            ids if data.new_webhook_id is None else {**ids, "new_webhook_id": data.new_webhook_id}
        )

    def irreversible_words(self) -> str:
        return (
            "the old webhook is being or has been deleted, and a deleted webhook cannot be restored"
        )

    async def open_session(self, services: Services, rotation: Rotation, fence: Fence) -> Any:
        config = services.credential_config(rotation.credential)
        return await services.provider_session(
            dfns_webhook_session, self.signer(config) or "", with_key=True, fence=fence
        )

    def imported(
        self, name: str, config: CredentialConfig, material: bytes, services: Services
    ) -> str:
        if not material.strip():
            raise KeyturnError("--secret-file is empty; it must hold the webhook's secret")
        return "hmac-sha256"

    async def reconcile(self, services: Services, item: ReconcileInput) -> list[Finding]:
        return await _reconcile(services, item)


_WEBHOOK_BY = re.compile(r"^keyturn rotation (rot_[A-Za-z0-9]+)$")


async def _reconcile(services: Services, item: ReconcileInput) -> list[Finding]:
    managed = item.managed
    name = managed.name
    signer = WEBHOOK.signer(item.config) or ""
    try:
        provider = await services.provider_session(dfns_webhook_session, signer, with_key=True)
        try:
            hooks = await provider.list_webhooks()
        finally:
            await provider.aclose()
    except KeyturnError as exc:
        return [Finding("unreachable", name, f"cannot list webhooks: {exc}")]
    findings: list[Finding] = []
    rotations = {r.id: r for r in item.rotations}
    by_id: dict[str, WebhookInfo] = {w.id: w for w in hooks}
    for w in hooks:
        m = _WEBHOOK_BY.match(w.description or "")
        if m is None:
            continue
        rid = m.group(1)
        rotation = rotations.get(rid)
        if rotation is None:
            if rid not in item.known_rotations:  # another webhook's rotation reports its own
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
        new_id = rotation.data.get("new_webhook_id")
        if new_id != w.id and not rotation.finished:
            continue  # its creation is still being reconciled by the rotation itself
        if new_id != w.id or rotation.state.value == "rolled_back":
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
    in_flight = any(not r.finished for r in item.rotations)
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
    if current is not None:
        findings.extend(_unaccounted(item, current.url, hooks))
    return findings


def _unaccounted(item: ReconcileInput, url: str, hooks: list[WebhookInfo]) -> list[Finding]:
    """Enabled webhooks to the managed URL that keyturn does not account for: events would be
    signed with a secret keyturn does not rotate."""
    accounted = {item.managed.credential_id}
    for r in item.rotations:
        if not r.finished:
            accounted |= {str(r.data.get("old_webhook_id")), str(r.data.get("new_webhook_id"))}
    return [
        Finding(
            "unaccounted",
            item.managed.name,
            f"webhook {w.id} also delivers to {url} and keyturn neither manages nor is rotating "
            "it (its secret is not rotated); delete it at the provider if nobody should",
            provider_credential_uuid=w.id,
        )
        for w in hooks
        if w.url == url and w.status == "Enabled" and w.id not in accounted
    ]


WEBHOOK = WebhookKind()
