"""End users' passkey rotation: a task for the user that keyturn orchestrates, tracks and can undo.

keyturn never holds a passkey, so it never writes for the user: the user pages relay the user's
signatures (see :mod:`.tasks`), and every step here is a wait that observes the provider and the
evidence the pages record:

- add_new: a one-time link (its token sealed, its hash in the data) goes to the user; then wait
  until the provider shows an active passkey named for this rotation -> new_added.
- verify: wait for evidence that the provider accepted an assertion by the new passkey (a real
  signature, not registration alone) -> verified.
- deactivate_old: with a domain move, wait for the campaign's cutover and send a new link on the
  new origin; then wait until the provider shows the old passkey inactive -> old_deactivated.
- rollback: a link that asks the user to switch the new passkey off (and the old one on);
  wait until the provider shows it -> rolled_back.

A user who never acts keeps the old passkey: nothing here can remove it.

Each member of a ``[credentials.NAME]`` entry of this kind is one user: the managed credential
``NAME:USERNAME`` whose credential id and uuid are the user's current passkey.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field

from keyturn.kinds.passkey import tasks as t
from keyturn.plugin import (
    MEMBER_SEP,
    Action,
    Call,
    CredentialConfig,
    Detail,
    F,
    Facts,
    Fence,
    Finish,
    ImportSpec,
    KeyturnError,
    Kind,
    ManagedCredential,
    PasskeyProvider,
    ProviderCredential,
    R,
    Reminders,
    Rotation,
    RotationData,
    Services,
    Step,
    StepContext,
    Trigger,
    Wait,
    dfns_passkey_session,
    user_task,
)

DAY = 86400.0
#: Where the user pages are mounted on `keyturn serve`'s user listener.
PAGES_PREFIX = "/passkey"


class PasskeyConfig(CredentialConfig):
    """``[credentials.NAME]`` with ``kind = "passkey"``: a population of end users."""

    has_members: ClassVar[bool] = True

    #: The service account (a managed credential here) that logs users in by delegation.
    signer: str
    #: The origin of the user pages (the listener of `keyturn serve --user-port`), where links
    #: point and where the users' current passkeys live.
    origin: str
    #: The users have this long to act (from the invitation).
    deadline_seconds: float = Field(default=14 * DAY, gt=0)
    #: Reminders this long before the deadline, then every `remind_every_seconds` after the
    #: last of them (0: no daily reminder).
    remind_before_seconds: list[float] = Field(default_factory=lambda: [7 * DAY, DAY])
    remind_every_seconds: float = Field(default=DAY, ge=0)
    #: A user may snooze this many times, each postponing the next reminder this long.
    snoozes: int = Field(default=3, ge=0)
    snooze_seconds: float = Field(default=DAY, gt=0)
    #: At the deadline: "halt" for a human, or "report" (escalated, left with the old passkey).
    on_deadline: Literal["halt", "report"] = "halt"
    #: How often a waiting rotation asks the provider (the pages wake it sooner).
    check_every_seconds: float = Field(default=60.0, gt=0)


class PasskeyData(RotationData):
    username: str
    old_credential_uuid: str
    old_credential_id: str
    user_id: str | None = None
    campaign: str | None = None
    #: The new domain's origin for a domain move (None: same origin).
    new_origin: str | None = None
    new_rp_id: str | None = None
    #: The task's deadline (ISO, UTC), set when the user is invited.
    due: str | None = None
    #: The link valid now: its hash, its sealed URL, what it asks for, until when.
    link_hash: str | None = None
    link_ref: str | None = None
    link_task: str | None = None
    link_expires: str | None = None
    new_credential_uuid: str | None = None
    new_credential_id: str | None = None
    #: The snoozes the user used (counted from the evidence at each check).
    snoozed: int = 0


Ctx = StepContext[PasskeyData, PasskeyProvider]


def cfg(ctx: Ctx) -> PasskeyConfig:
    assert isinstance(ctx.config, PasskeyConfig)
    return ctx.config


def link_url(origin: str, token: str) -> str:
    return f"{origin.rstrip('/')}{PAGES_PREFIX}/l/{token}"


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ links


def _issue(ctx: Ctx, task: t.Task, origin: str) -> None:
    """A new link for `task` (the previous one stops working): sealed, its hash in the data."""
    token = t.new_link_token(ctx.rotation.id)
    now = ctx.schedule_now()
    due = ctx.data.due
    if due is None or task != "enrol":
        due = _iso(now + timedelta(seconds=cfg(ctx).deadline_seconds))
    ctx.update(
        link_hash=t.link_hash(token),
        link_ref=ctx.seal("user_link", link_url(origin, token).encode()),
        link_task=task,
        link_expires=due,
        due=due,
    )


def _inviter(task: t.Task, *, new_origin: bool = False, when: Any = None) -> Action[Ctx]:
    async def prepare(ctx: Ctx) -> None:
        origin = (ctx.data.new_origin if new_origin else None) or cfg(ctx).origin
        if ctx.data.link_task != task or (ctx.data.link_ref is None):
            _issue(ctx, task, origin)

    async def run(ctx: Ctx) -> Detail:
        # the user's invitation: a user_task notification, its link opened at send time
        return user_task(ctx.data.username, _due(ctx), ctx.data.link_ref, task=task)

    extra = {"when": when} if when is not None else {}
    return Action(
        R if task == "rollback" else F,
        f"invite_{task}",
        run,
        prepare=prepare,
        plan=lambda _f: [Call.wait(f"a link to the user ({task})")],
        **extra,
    )


# ------------------------------------------------------------------------------ observing


async def _credentials(ctx: Ctx) -> list[ProviderCredential]:
    return await ctx.session.user_credentials(ctx.data.username)


def _ours(ctx: Ctx, found: Sequence[ProviderCredential]) -> ProviderCredential | None:
    name = t.passkey_name(ctx.rotation.id)
    for c in found:
        if c.kind == "Fido2" and c.name == name:
            return c
    return None


def _due(ctx: Ctx) -> datetime:
    if ctx.data.due is None:
        return ctx.schedule_now() + timedelta(seconds=cfg(ctx).deadline_seconds)
    return datetime.fromisoformat(ctx.data.due)


async def _evidence(ctx: Ctx) -> dict[str, Detail]:
    """The evidence recorded so far; the user's snoozes are counted on the way."""
    found = await ctx.evidence()
    snoozed = sum(1 for name in found if name.startswith(f"{t.SNOOZED}:"))
    if snoozed != ctx.data.snoozed:
        ctx.update(snoozed=snoozed)
    return found


def _reminders(ctx: Ctx) -> Reminders:
    """The user's task: reminders before the deadline, snoozes, escalation (the policy of the
    entry), the link they hold."""
    c = cfg(ctx)
    return Reminders(
        person=ctx.data.username,
        due=_due(ctx),
        before=tuple(c.remind_before_seconds),
        then_every=c.remind_every_seconds or None,
        snoozes=c.snoozes,
        snooze_seconds=c.snooze_seconds,
        snoozed=ctx.data.snoozed,
        escalate=True,
        on_due=c.on_deadline,
        link_ref=ctx.data.link_ref,
    )


def _user(ctx: Ctx) -> str:
    return f"the user {ctx.data.username}"


async def _registered(ctx: Ctx) -> str | None:
    await _evidence(ctx)
    found = _ours(ctx, await _credentials(ctx))
    if found is None or not found.is_active:
        return f"{_user(ctx)} to register a new passkey (link sent, due {ctx.data.due})"
    ctx.update(new_credential_uuid=found.credential_uuid, new_credential_id=found.credential_id)
    return None


async def _proven(ctx: Ctx) -> str | None:
    proof = (await _evidence(ctx)).get(t.PROVEN)
    if proof is None or proof.get("credential_id") != ctx.data.new_credential_id:
        return f"{_user(ctx)} to sign in with the new passkey (due {ctx.data.due})"
    return None


async def _cutover(ctx: Ctx) -> str | None:
    if t.CUTOVER in await ctx.evidence():
        return None
    return f"the cutover of campaign {ctx.data.campaign} (keyturn passkeys cutover)"


async def _old_inactive(ctx: Ctx) -> str | None:
    await _evidence(ctx)
    for c in await _credentials(ctx):
        if c.credential_uuid == ctx.data.old_credential_uuid and c.is_active:
            return f"{_user(ctx)} to switch the old passkey off (due {ctx.data.due})"
    return None


async def _undone(ctx: Ctx) -> str | None:
    await _evidence(ctx)
    found = await _credentials(ctx)
    ours = _ours(ctx, found)
    old = next((c for c in found if c.credential_uuid == ctx.data.old_credential_uuid), None)
    if (ours is None or not ours.is_active) and (old is None or old.is_active):
        return None
    return f"{_user(ctx)} to switch the new passkey off and keep the old one (due {ctx.data.due})"


def _wait(phase: Any, name: str, check: Any, *, when: Any = None, person: bool = True) -> Wait[Ctx]:
    """A wait on the user (with the entry's reminders; its deadline is the user's), or, with
    ``person=False``, on an operator (a year)."""
    extra: dict[str, Any] = {"when": when} if when is not None else {}
    if person:
        extra["remind"] = _reminders
    return Wait(
        phase,
        name,
        check,
        every=lambda ctx: cfg(ctx).check_every_seconds,
        deadline=lambda _ctx: 365 * DAY,
        plan=lambda _f: [Call.poll("GET", "/auth/credentials", note=f"{name} (the user acts)")],
        **extra,
    )


def _domain_move(facts: Facts) -> bool:
    return bool(getattr(facts.data, "new_origin", None))


async def _finish_add_new(ctx: Ctx) -> Finish:
    return Finish(detail={"new_credential_uuid": ctx.data.new_credential_uuid})


async def _finish_forward(ctx: Ctx) -> Finish:
    credential = await ctx.credential()
    return Finish(
        credential=replace(
            credential,
            credential_id=ctx.data.new_credential_id or credential.credential_id,
            credential_uuid=ctx.data.new_credential_uuid or credential.credential_uuid,
            updated_at=ctx.now(),
        )
    )


STEPS: Mapping[Trigger, Step[Ctx]] = {
    Trigger.ADD_NEW: Step(
        [_inviter("enrol"), _wait(F, "new_passkey", _registered)], finish=_finish_add_new
    ),
    Trigger.VERIFY: Step([_wait(F, "proven", _proven)]),
    Trigger.DEACTIVATE_OLD: Step(
        [
            _wait(F, "cutover", _cutover, when=_domain_move, person=False),
            _inviter("deactivate", new_origin=True, when=_domain_move),
            _wait(F, "old_inactive", _old_inactive),
        ],
        finish=_finish_forward,
    ),
    Trigger.FINISH_ROLLBACK: Step(
        [
            _inviter("rollback", when=lambda facts: facts.done(F, "invite_enrol")),
            _wait(R, "undone", _undone),
        ]
    ),
}


#: A campaign's progress, in the order a user moves through it.
PROGRESS = ("invited", "registered", "proven", "done", "overdue", "rolled_back", "cancelled")
_BY_STATE = {
    "pending": "invited",
    "new_added": "registered",
    "verified": "proven",
    "old_deactivated": "done",
}


class PasskeyKind(Kind):
    name = "passkey"
    description = "end users' passkeys (the user registers, proves and switches; keyturn tracks)"
    config_model = PasskeyConfig
    data_model = PasskeyData
    material = "none"
    import_spec = ImportSpec(needs_uuid=True, needs_token=False)
    steps = STEPS
    progress_labels = PROGRESS

    def progress_label(self, rotation: Rotation, now: datetime) -> str:
        """invited, registered, proven, done, overdue (unfinished past the user's deadline),
        rolled_back or cancelled."""
        due = rotation.data.get("due")
        if not rotation.finished and isinstance(due, str) and datetime.fromisoformat(due) < now:
            return "overdue"
        return _BY_STATE.get(rotation.state.value, rotation.state.value)

    def check_config(
        self, name: str, config: CredentialConfig, signers: Collection[str]
    ) -> str | None:
        assert isinstance(config, PasskeyConfig)
        if config.signer not in signers:
            return (
                f"key credentials.{name}.signer: name the service_account credential configured "
                "here that logs users in by delegation"
            )
        problem = origin_problem(config.origin)
        if problem:
            return f"key credentials.{name}.origin: {problem}"
        return None

    def signer(self, config: CredentialConfig) -> str | None:
        assert isinstance(config, PasskeyConfig)
        return config.signer

    def options(self, config: CredentialConfig) -> dict[str, Any]:
        return {}

    def start(self, credential: ManagedCredential, options: Mapping[str, Any]) -> PasskeyData:
        _entry, sep, username = credential.name.partition(MEMBER_SEP)
        if not sep or not username:
            raise KeyturnError(
                f"credential {credential.name} is not a user of a passkey entry "
                "(ENTRY:USERNAME); start passkey rotations with `keyturn passkeys campaign`"
            )
        return PasskeyData(
            username=username,
            old_credential_uuid=credential.credential_uuid,
            old_credential_id=credential.credential_id,
            user_id=options.get("user_id"),
            campaign=options.get("campaign"),
            new_origin=options.get("new_origin"),
            new_rp_id=options.get("new_rp_id"),
        )

    def identities(self, data: Any) -> dict[str, str | None]:
        ids: dict[str, str | None] = {"old_credential_uuid": data.old_credential_uuid}
        if data.new_credential_uuid:
            ids["new_credential_uuid"] = data.new_credential_uuid
        return ids

    async def open_session(self, services: Services, rotation: Rotation, fence: Fence) -> Any:
        config = services.credential_config(rotation.credential)
        return await services.provider_session(
            dfns_passkey_session, self.signer(config) or "", with_key=True, fence=fence
        )

    def imported(
        self, name: str, config: CredentialConfig, material: bytes, services: Services
    ) -> str:
        return "fido2"

    def user_app(self, services: Services) -> Any | None:
        """The user pages (sign in with the old passkey, register and prove the new one)."""
        from keyturn.kinds.passkey.backend import ServicesTasks
        from keyturn.kinds.passkey.pages import user_app

        return user_app(ServicesTasks(services), secure_cookies=False, root=PAGES_PREFIX)


def origin_problem(origin: str) -> str | None:
    """Why `origin` cannot serve passkey pages (None: it can)."""
    parts = urlsplit(origin)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host or parts.path not in ("", "/"):
        return f"{origin!r} is not an origin; give scheme://host[:port]"
    local = host == "localhost" or host.endswith(".localhost")
    if parts.scheme == "http" and not local:
        return f"{origin!r} is not a secure context; browsers refuse passkeys there; use https://"
    return None


def rp_id_fits(rp_id: str, origin: str) -> bool:
    """An rpId is usable from an origin when it is the origin's host or a parent domain of it."""
    host = (urlsplit(origin).hostname or "").lower()
    value = rp_id.strip().lower()
    return bool(value) and (host == value or host.endswith("." + value))


PASSKEY = PasskeyKind()
