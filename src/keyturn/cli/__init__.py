"""The `keyturn` command line: the contract other tools rely on (keep these names).

Start-up matters (an on-call engineer runs many commands): importing this module must stay
cheap. SQLAlchemy, Alembic, pydantic and the plugins load when a command first needs the
config or the store (keyturn.config and keyturn.cli.wiring import them where they are used),
and the sandbox and receiver apps (a web stack) only when one of their commands runs.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import typer
from typer.core import TyperGroup

from keyturn.cli import liveness, render
from keyturn.cli.wiring import Wiring, actor
from keyturn.cli.workers import mount as mount_workers
from keyturn.domain.errors import KeyturnError
from keyturn.domain.lifecycle import State
from keyturn.domain.model import OperatorAction
from keyturn.engine.registry import discovered

if TYPE_CHECKING:
    import asyncio

    from typer import _click as click  # typer vendors its own click

    from keyturn.config import Config
else:

    class _Deferred:
        """A module imported at its first attribute access (asyncio costs a fifth of this
        module's import and only the commands that run an event loop need it)."""

        def __init__(self, name: str) -> None:
            self._name = name

        def __getattr__(self, attribute: str) -> Any:
            return getattr(importlib.import_module(self._name), attribute)

    asyncio = _Deferred("asyncio")


class _LazyGroup(TyperGroup):
    """The `keyturn` group. A sub-app registered in `lazy` is imported only when one of its
    commands runs (or its own help is asked for); the top-level help lists it from its help
    line alone."""

    #: name -> ("module:attribute" of its typer app, help line)
    lazy: ClassVar[dict[str, tuple[str, str]]] = {}
    _listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = list(super().list_commands(ctx))
        return names + [n for n in self.lazy if n not in names]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None or cmd_name not in self.lazy:
            return cmd
        target, help_line = self.lazy[cmd_name]
        if self._listing:
            return TyperGroup(name=cmd_name, help=help_line)
        module, attribute = target.split(":")
        sub_app = getattr(importlib.import_module(module), attribute)
        cmd = typer.main.get_group(sub_app)  # a group even when it has one command
        cmd.name, cmd.help = cmd_name, help_line
        self.commands[cmd_name] = cmd
        return cmd

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    name="keyturn",
    cls=_LazyGroup,
    help="Durable, resumable rotation of Dfns credentials.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True, add_completion=False)
rotations_app = typer.Typer(
    help="See, resume, pause, cancel or roll back rotations.",
    no_args_is_help=True,
    add_completion=False,
)
credentials_app = typer.Typer(
    help="Managed credentials.", no_args_is_help=True, add_completion=False
)
keys_app = typer.Typer(
    help="The master key that encrypts stored keys and secrets.",
    no_args_is_help=True,
    add_completion=False,
)
# Each group's commands are built (typer inspects every function's signature) only when one
# of them runs: a command pays for its own group, not for all of them.
for _name, _attribute, _sub_app in [
    ("db", "db_app", db_app),
    ("rotations", "rotations_app", rotations_app),
    ("credentials", "credentials_app", credentials_app),
    ("keys", "keys_app", keys_app),
]:
    _LazyGroup.lazy[_name] = (f"{__name__}:{_attribute}", str(_sub_app.info.help))

out = render.lazy_console(highlight=False, soft_wrap=True)


class _State:
    config_path: Path | None = None
    log_format: str | None = None
    _config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            from keyturn.config import load_config

            self._config = load_config(self.config_path)
            from keyturn import logs

            logs.configure(
                self.log_format or self._config.logging.format, self._config.logging.level
            )
        return self._config

    def wiring(self) -> Wiring:
        return Wiring(self.config())


state = _State()


def _version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("keyturn")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree, not installed
        installed = "unknown (not installed)"
    sys.stdout.write(f"keyturn {installed}\n")
    raise typer.Exit()


@app.callback()
def _main(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML config (or KEYTURN_CONFIG).")
    ] = None,
    log_format: Annotated[
        str | None, typer.Option("--log-format", help="auto, console or json.")
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print keyturn's version and exit."
        ),
    ] = False,
) -> None:
    if log_format is not None and log_format not in ("auto", "console", "json"):
        raise KeyturnError(f"--log-format {log_format!r} is not known; use auto, console or json")
    state.config_path = config
    state.log_format = log_format
    from keyturn import logs

    logs.configure(log_format or "auto")


def _print_json(obj: Any) -> None:
    sys.stdout.write(render.dump(obj) + "\n")


# ------------------------------------------------------------------------------------------ db


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the database schema to the newest revision."""
    from keyturn.adapters.store.migrate import upgrade

    config = state.config()
    upgrade(config.database.url, source=config.database_url_from)
    out.print("database is at the newest schema revision")


# ------------------------------------------------------------------------------------- rotate


def _rotation_names(w: Wiring, chosen: list[str], every: bool, kind: str | None) -> list[str]:
    if sum((bool(chosen), every, kind is not None)) != 1:
        raise KeyturnError("name the credentials to rotate: NAME..., --all, or --kind KIND")
    if every or kind is not None:
        if kind is not None:
            discovered().kind(kind)  # an unknown kind names the installed ones
        chosen = [c.name for c in w.store.list_credentials() if kind is None or c.kind == kind]
        if not chosen:
            raise KeyturnError(
                "no managed credential" + (f" of kind {kind}" if kind else "") + " to rotate"
            )
    elif len(chosen) == 1:
        w.store.get_credential(chosen[0])  # an unknown name: a clear error before anything else
    return list(dict.fromkeys(chosen))


@app.command()
def rotate(
    names: Annotated[
        list[str] | None,
        typer.Argument(metavar="[NAME]...", help="Managed credential names.", show_default=False),
    ] = None,
    every: Annotated[bool, typer.Option("--all", help="Every managed credential.")] = False,
    kind: Annotated[
        str | None, typer.Option("--kind", help="Every managed credential of this kind.")
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")] = "manual rotation",
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help='{"id": first id, "started": [{credential, id}], "refused": [...]}'
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Print what a rotation would do now (gates, then every external call in "
            "order) and start nothing.",
        ),
    ] = False,
    now_: Annotated[
        bool,
        typer.Option(
            "--now",
            help="Start even inside a freeze or against the policy's stagger and "
            "max_concurrent limits.",
        ),
    ] = False,
) -> None:
    """Start rotations of managed credentials (one transaction each); a worker carries them
    out. A name that cannot start gets one line and the exit code is 1. A credential's policy
    is respected (freezes, stagger, max_concurrent) unless --now."""
    w = state.wiring()
    chosen = _rotation_names(w, list(names or []), every, kind)
    if dry_run:
        _dry_run(w, chosen, as_json)
        return
    w.checked_vault()
    started: list[dict[str, str]] = []
    refused: list[dict[str, str]] = []
    for name in chosen:
        try:
            if not now_:
                _respect_policy(w, name)
            rotation = w.start_rotation(name, reason=reason, actor=actor())
            _record_start(w, rotation)
            started.append({"credential": name, "id": rotation.id})
        except KeyturnError as exc:
            if len(chosen) == 1:
                raise
            refused.append({"credential": name, "error": str(exc)})
    if as_json:
        _print_json(
            {"id": started[0]["id"] if started else None, "started": started, "refused": refused}
        )
    elif len(chosen) == 1:
        out.print(started[0]["id"])
    else:
        for s_ in started:
            out.print(f"{s_['id']}  {s_['credential']}", markup=False)
        for r in refused:
            sys.stderr.write(f"keyturn: error: {r['credential']}: {r['error']}\n")
    if refused:
        raise typer.Exit(1)


def _dry_run(w: Wiring, chosen: list[str], as_json: bool) -> None:
    from keyturn.cli.schedule import Planned, _gates, calls_of
    from keyturn.engine.planner import describe

    now = w.schedule_time.now()
    docs = []
    for name in chosen:
        managed = w.store.get_credential(name)
        policy = w.config.policy_of(name)
        item = Planned(name, policy.name if policy else None, now, None, "rotate (by hand)")
        item.gates = _gates(policy) if policy else []
        item.actions = calls_of(w, managed)
        if as_json:
            docs.append(item.as_dict())
            continue
        out.print(f"rotating {name} now would, in order:", markup=False)
        for g in item.gates:
            out.print(f"  gate: {g}", markup=False)
        for line in describe(item.actions):
            out.print(f"  {line}", markup=False)
    if as_json:
        _print_json({"dry_run": True, "rotations": docs})


def _record_start(w: Wiring, rotation: Any) -> None:
    """A start by hand counts for the policy's stagger and for the next slot, as a fired slot."""
    from keyturn.domain.model import Slot

    policy = w.config.policy_of(rotation.credential)
    if policy is None:
        return
    now = w.schedule_time.now().replace(microsecond=0)
    w.slots.record_start(
        Slot(
            credential=rotation.credential,
            slot=now,
            due_at=now,
            fingerprint="manual",
            policy=policy.name,
            group=policy.group,
            why=f"rotated by hand by {actor()}",
            status="fired",
            rotation_id=rotation.id,
            planned_by=actor(),
            fired_at=now,
        )
    )


def _respect_policy(w: Wiring, name: str) -> None:
    """Refuse a manual start the policy does not allow now (--now overrides)."""
    from keyturn.domain.schedule import freeze_at
    from keyturn.engine.scheduler import Scheduler

    policy = w.config.policy_of(name)
    if policy is None:
        return
    now = w.schedule_time.now()
    frozen = freeze_at(w.config.freezes, policy.group, now)
    if frozen is not None:
        raise KeyturnError(
            f"{name}: inside the freeze {frozen.reason!r} until {frozen.end.isoformat()}; "
            "wait for its end or pass --now"
        )
    deps = w.engine_deps()
    held = asyncio.run(Scheduler(deps, owner=f"cli:{actor()}").limits(name, policy, now))
    if held is not None:
        until, why = held
        when = f"; retry after {until.isoformat(timespec='seconds')}" if until else ""
        raise KeyturnError(f"{name}: {why}{when}, or pass --now")


# ---------------------------------------------------------------------------------- rotations


def _terminal() -> bool:
    return sys.stdout.isatty()


def _resolve_id(store: Any, given: str) -> str:
    """A full rotation id from an id or a unique prefix of one (like git); NotFound naming
    the fix otherwise."""
    from keyturn.domain.errors import NotFound

    matches = store.rotation_ids(given, limit=6)
    if given in matches:
        return given
    if len(matches) == 1:
        return str(matches[0])
    if not matches:
        raise NotFound(f"no rotation with id or id prefix {given!r}; see `keyturn rotations list`")
    shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
    raise KeyturnError(f"id prefix {given!r} matches several rotations ({shown}); give more of it")


def _target_rotation(store: Any, rotation_id: str | None, latest: str | None) -> str:
    """The rotation a verb acts on: an id, a unique prefix, or `--latest NAME`."""
    if (rotation_id is None) == (latest is None):
        raise KeyturnError(
            "name the rotation: an ID (or a unique prefix of one), or --latest CREDENTIAL"
        )
    if latest is not None:
        store.get_credential(latest)
        found = store.latest_rotation(latest)
        if found is None:
            raise KeyturnError(f"credential {latest} has no rotation yet")
        return str(found.id)
    assert rotation_id is not None
    from keyturn.domain.errors import NotFound

    try:
        return _resolve_id(store, rotation_id)
    except NotFound:
        if not _is_credential(store, rotation_id):
            raise
        raise KeyturnError(
            f"{rotation_id} is a credential, not a rotation id; a verb that changes something "
            f"needs the rotation: --latest {rotation_id}, or an id from "
            f"`keyturn rotations show {rotation_id}`"
        ) from None


def _is_credential(store: Any, name: str) -> bool:
    from keyturn.domain.errors import NotFound

    try:
        store.get_credential(name)
    except NotFound:
        return False
    return True


def _since(text: str, now: datetime) -> datetime:
    m = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return now - timedelta(seconds=int(m.group(1)) * unit)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise KeyturnError(
            f"--since {text!r} is neither a duration (30m, 24h, 7d) nor an ISO date or time"
        ) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _choice(option: str, value: str | None, allowed: Iterable[str]) -> str | None:
    allowed = list(allowed)
    if value is not None and value not in allowed:
        raise KeyturnError(f"{option} {value!r} is not known; use one of {', '.join(allowed)}")
    return value


#: `worker --until-idle` left rotations halted (documented in the README).
EXIT_HALTED = 3

JSON_HELP = "Print JSON (every field the table shows, and more) instead of a table."


@rotations_app.command("list")
def rotations_list(
    state_filter: Annotated[str | None, typer.Option("--state", help="Only this state.")] = None,
    status: Annotated[
        str | None,
        typer.Option("--status", help="Only this status: " + ", ".join(render.STATUSES) + "."),
    ] = None,
    credential: Annotated[
        str | None, typer.Option("--credential", help="Only this credential's rotations.")
    ] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="Only this kind.")] = None,
    needs_attention: Annotated[
        bool,
        typer.Option(
            "--attention",
            help="Only rotations that need a human: halted, holder lost, a request not "
            "applied, waiting past half its deadline, retrying.",
        ),
    ] = False,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only rotations updated since (30m, 24h, 7d or ISO)."),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most N rows.")] = None,
    wide: Annotated[
        bool, typer.Option("--wide", help="Full ids on a terminal (always full when piped).")
    ] = False,
    local: Annotated[bool, typer.Option("--local", help="Local time instead of UTC.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Rotations, newest first."""
    from keyturn.engine.attention import attention
    from keyturn.engine.listing import list_rotations

    wanted = _choice("--state", state_filter, (s.value for s in State))
    _choice("--status", status, render.STATUSES)
    if kind is not None:
        discovered().kind(kind)  # an unknown kind names the installed ones
    now = datetime.now(UTC)
    after = _since(since, now) if since is not None else None
    store = state.wiring().store
    if credential is not None:
        store.get_credential(credential)
    # filtered in the store's query; the status and attention definitions decide on its rows
    rotations, _ = list_rotations(
        store,
        now,
        state=State(wanted) if wanted else None,
        status=status,
        credential=credential,
        kind=kind,
        attention_only=needs_attention,
        since=after,
        limit=limit,
    )
    if as_json:
        _print_json(
            [
                {**render.rotation_dict(r), "status": render.status_key(r),
                 "status_text": render.status_of(r), "attention": attention(r, now)}
                for r in rotations
            ]
        )  # fmt: skip
    elif not rotations:
        sys.stdout.write("no rotations\n")
    elif not _terminal():
        sys.stdout.write(render.plain_rotations(rotations) + "\n")
    else:
        out.print(render.rotations_table(rotations, short=not wide, local=local))


@rotations_app.command("show")
def rotations_show(
    rotation_id: Annotated[
        str,
        typer.Argument(
            metavar="ID|CREDENTIAL",
            help="A rotation id, a unique prefix of one, or a credential (its latest rotation).",
        ),
    ],
    local: Annotated[bool, typer.Option("--local", help="Local time instead of UTC.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """State, lease, attempts, halted reason, action records and the timeline."""
    from keyturn.domain.errors import NotFound

    store = state.wiring().store
    try:
        rotation_id = _resolve_id(store, rotation_id)
    except NotFound:
        latest = None
        if rotation_id in {c.name for c in store.list_credentials()}:
            latest = store.latest_rotation(rotation_id)
        if latest is None:
            raise
        rotation_id = latest.id
    rotation = store.get_rotation(rotation_id)
    lease_seconds = state.config().worker.lease_seconds
    if as_json:
        _print_json(render.show_document(store, rotation, lease_seconds))
        return
    lease = liveness.LeaseView.of(store, rotation, lease_seconds)
    events, actions = store.events(rotation_id), store.actions(rotation_id)
    render.show_rotation(out, rotation, events, actions, local=local, lease=lease.lines())


def _requested(w: Wiring, action: OperatorAction, rotation: Any) -> str:
    """What happens to a request recorded while a lease is held: said truthfully, from the
    holder's heartbeat."""
    now = w.clock.now()
    owner = rotation.lease_owner
    until = render.when(rotation.lease_expires_at)
    holder = w.store.get_workers([owner]).get(owner) if owner else None
    live = holder is not None and holder.status(now) == "live"
    if action is OperatorAction.RELEASE_LEASE:
        if live:
            return (
                f"release-lease requested; the worker holding rotation {rotation.id} ({owner}) "
                "gives its lease back at its next action boundary"
            )
        return (
            f"release-lease requested; the holder of rotation {rotation.id} ({owner}) is not "
            f"seen, and a lease is never cut short: the rotation can be claimed when its "
            f"lease expires ({until}), and the next worker to claim it records the release; "
            f"{liveness.next_step_hint(w.store, now)}"
        )
    if live:
        return (
            f"{action.value} requested; the worker holding rotation {rotation.id} ({owner}, "
            f"lease until {until}) carries it out at its next action boundary"
        )
    return (
        f"{action.value} requested; the holder of rotation {rotation.id} ({owner}) is not "
        f"seen, so the next worker to claim it after its lease ends ({until}) carries it "
        f"out; {liveness.next_step_hint(w.store, now)}"
    )


def _operator(action: OperatorAction, rotation_id: str, reason: str) -> None:
    from keyturn.engine.operator import request_action

    w = state.wiring()
    deps = w.engine_deps()
    rotation, applied = asyncio.run(request_action(deps, rotation_id, action, actor(), reason))
    if applied is None:
        out.print(_requested(w, action, rotation), markup=False)
        return
    if applied.outcome != "applied":
        raise KeyturnError(f"{action.value} of rotation {rotation_id} {applied.outcome}")
    follow = ""
    if not rotation.finished and not rotation.paused:
        follow = "; " + liveness.next_step_hint(w.store, w.clock.now())
    out.print(
        f"{action.value} applied; rotation {rotation_id} is now {rotation.state.value} "
        f"({render.status_of(rotation)}){follow}"
    )


IdArg = Annotated[
    str | None,
    typer.Argument(
        metavar="[ID]", help="A rotation id or a unique prefix of one.", show_default=False
    ),
]
LatestOpt = Annotated[
    str | None,
    typer.Option("--latest", metavar="CREDENTIAL", help="The credential's latest rotation."),
]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (recorded in the timeline).")]


@rotations_app.command("resume")
def rotations_resume(
    rotation_id: IdArg = None, *, reason: ReasonOpt, latest: LatestOpt = None
) -> None:
    """Resume a halted or paused rotation with a fresh retry budget."""
    _operator(
        OperatorAction.RESUME, _target_rotation(state.wiring().store, rotation_id, latest), reason
    )


def _rollback_plan(w: Wiring, rotation_id: str) -> tuple[Any, list[Any]]:
    """The rotation and its rollback plan from where it stands (refused as the verb would be)."""
    from keyturn.engine.operator import validate
    from keyturn.engine.planner import plan

    store = w.store
    rotation = store.get_rotation(rotation_id)
    registry = discovered()
    if rotation.state is not State.ROLLING_BACK:
        validate(store, registry, rotation, OperatorAction.ROLLBACK)
    deps = w.engine_deps()
    planned = plan(
        registry,
        rotation,
        store.actions(rotation_id),
        targets=[t.name for t in deps.targets(rotation.credential)],
        probes=[p.name for p in deps.probes(rotation.credential)],
        rollback=True,
    )
    return rotation, planned


def _plan_json(rotation: Any, planned: list[Any]) -> dict[str, Any]:
    return {
        "rotation": rotation.id,
        "state": rotation.state.value,
        "actions": [
            {
                "step": p.trigger.value,
                "phase": p.phase.value,
                "name": p.name,
                "calls": [
                    {"what": c.what, "method": c.method, "path": c.path, "signed": c.signed,
                     "name": c.name, "op": c.op, "repeat": c.repeat, "note": c.note,
                     "provider_requests": c.provider_requests(), "text": c.describe()}
                    for c in p.calls
                ],
            }
            for p in planned
        ],
    }  # fmt: skip


def _print_plan(rotation: Any, planned: list[Any]) -> None:
    from keyturn.engine.planner import describe

    out.print(
        f"rolling back rotation {rotation.id} ({rotation.credential}, now {rotation.state.value}) "
        "would, in order:",
        markup=False,
    )
    for line in describe(planned):
        out.print(f"  {line}", markup=False)


@rotations_app.command("rollback")
def rotations_rollback(
    rotation_id: IdArg = None,
    *,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why (recorded in the timeline).")
    ] = None,
    latest: LatestOpt = None,
    preview: Annotated[
        bool, typer.Option("--preview", help="Print what the rollback would do; change nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Roll back without asking (scripts).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The preview as JSON.")] = False,
) -> None:
    """Undo a rotation: old credential active and deployed, new one inactive. Shows what it
    will do first and asks (on a terminal; elsewhere pass --yes)."""
    w = state.wiring()
    rid = _target_rotation(w.store, rotation_id, latest)
    rotation, planned = _rollback_plan(w, rid)
    if preview:
        if as_json:
            _print_json(_plan_json(rotation, planned))
        else:
            _print_plan(rotation, planned)
        return
    if reason is None or not reason.strip():
        raise KeyturnError("a reason is required for every operator action; pass --reason TEXT")
    if not yes:
        _print_plan(rotation, planned)
        if not _terminal() or not sys.stdin.isatty():
            raise KeyturnError(
                f"rollback of {rid} not confirmed: review the plan above, then run it again "
                "with --yes"
            )
        if not typer.confirm("Roll back as above?", default=False):
            raise KeyturnError(f"rollback of {rid} not confirmed; nothing changed")
        # bound to what was shown: if the rotation moved meanwhile, show the new plan instead
        moved, again = _rollback_plan(w, rid)
        if (moved.state, _plan_json(moved, again)) != (
            rotation.state,
            _plan_json(rotation, planned),
        ):
            _print_plan(moved, again)
            raise KeyturnError(
                f"rotation {rid} moved while you read the plan (now {moved.state.value}); "
                "nothing changed: review the new plan above and run the rollback again"
            )
    _operator(OperatorAction.ROLLBACK, rid, reason)


@rotations_app.command("cancel")
def rotations_cancel(
    rotation_id: IdArg = None, *, reason: ReasonOpt, latest: LatestOpt = None
) -> None:
    """Cancel a rotation that has not touched the provider yet."""
    _operator(
        OperatorAction.CANCEL, _target_rotation(state.wiring().store, rotation_id, latest), reason
    )


@rotations_app.command("pause")
def rotations_pause(
    rotation_id: IdArg = None, *, reason: ReasonOpt, latest: LatestOpt = None
) -> None:
    """Stop working on a rotation at its next action boundary until resumed."""
    _operator(
        OperatorAction.PAUSE, _target_rotation(state.wiring().store, rotation_id, latest), reason
    )


@rotations_app.command("approve")
def rotations_approve(
    rotation_id: IdArg = None, *, reason: ReasonOpt, latest: LatestOpt = None
) -> None:
    """Give the approval a rotation awaits (its policy's `approval`); it carries on."""
    _operator(
        OperatorAction.APPROVE, _target_rotation(state.wiring().store, rotation_id, latest), reason
    )


@rotations_app.command("deny")
def rotations_deny(
    rotation_id: IdArg = None, *, reason: ReasonOpt, latest: LatestOpt = None
) -> None:
    """Refuse the approval a rotation awaits: it rolls back (cancelled if nothing was done)."""
    _operator(
        OperatorAction.DENY, _target_rotation(state.wiring().store, rotation_id, latest), reason
    )


@rotations_app.command("release-lease")
def rotations_release_lease(
    rotation_id: IdArg = None, *, reason: ReasonOpt, latest: LatestOpt = None
) -> None:
    """Ask the worker holding a rotation's lease to give it back at its next action boundary.
    A lease is never cut short: when its holder is silent, the rotation can be claimed when
    the lease expires (the API allows this verb to admin tokens only)."""
    _operator(
        OperatorAction.RELEASE_LEASE,
        _target_rotation(state.wiring().store, rotation_id, latest),
        reason,
    )


# ------------------------------------------------------------------------------------- plan


def _until(text: str | None, now: datetime) -> datetime:
    if text is None:
        return now + timedelta(days=30)
    text = text.strip()
    if text and text[-1] in "smhdw" and text[:-1].replace(".", "").isdigit():
        from keyturn.domain.schedule import parse_duration

        return now + parse_duration(text)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise KeyturnError(
            f"--until {text!r} is not a date; give 2027-01-31, 2027-01-31T12:00+01:00 or 30d"
        ) from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


@app.command("plan")
def plan_command(
    until: Annotated[
        str | None,
        typer.Option("--until", metavar="DATE", help="Up to this date (ISO, or 30d; default 30d)."),
    ] = None,
    credential: Annotated[
        str | None, typer.Option("--credential", metavar="NAME", help="Only this credential.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Every rotation the policies would start before DATE: when (windows, freezes, stagger
    and jitter applied), why, and the exact external calls each would make, in order. Reads
    only: no rotation is started, no slot is written, nothing is called."""
    from keyturn.cli.schedule import plan_fleet
    from keyturn.engine.planner import describe

    w = state.wiring()
    if credential is not None:
        w.store.get_credential(credential)
        if w.config.policy_of(credential) is None:
            raise KeyturnError(
                f'credential {credential} has no policy; set policy = "NAME" in '
                f"[credentials.{credential}] (or define [policies.default])"
            )
    now = w.schedule_time.now()
    planned, notes = plan_fleet(w, until=_until(until, now), credential=credential)
    if as_json:
        _print_json({"now": now.isoformat(), "rotations": [p.as_dict() for p in planned],
                     "notes": notes})  # fmt: skip
        return
    if not planned:
        out.print("no rotation would start before " + _until(until, now).isoformat(), markup=False)
    for p in planned:
        extra = f" ({'; '.join(p.notes)})" if p.notes else ""
        head = f"{p.at.isoformat(timespec='seconds')}  {p.credential}  policy {p.policy}: {p.why}"
        out.print(head + extra, markup=False)
        for g in p.gates:
            out.print(f"  gate: {g}", markup=False)
        if p.deactivate_not_before is not None:
            not_before = p.deactivate_not_before.isoformat(timespec="seconds")
            out.print(f"  deactivate_old not before {not_before}", markup=False)
        for line in describe(p.actions):
            out.print(f"  {line}", markup=False)
    for n in notes:
        out.print(f"note: {n}", markup=False)


# -------------------------------------------------------------------------------- clock

clock_app = typer.Typer(
    help="Tests only: the schedule's clock shared through the database.", no_args_is_help=True
)
app.add_typer(clock_app, name="clock", hidden=True)


@clock_app.command("set")
def clock_set(
    at: Annotated[str, typer.Option("--at", help="What the schedule's clock reads now (ISO).")],
    scale: Annotated[
        float, typer.Option("--scale", help="Schedule seconds per real second.")
    ] = 1.0,
) -> None:
    """Make the schedule's clock read AT now and run SCALE times real time (every process on
    the database whose config says [schedule] test_clock = true follows it)."""
    from keyturn.ports import ClockAnchor

    w = state.wiring()
    if not w.config.schedule.test_clock:
        raise KeyturnError(
            "the shared test clock is off in this config; set test_clock = true in [schedule] "
            "(tests only)"
        )
    if scale <= 0:
        raise KeyturnError("--scale must be above 0")
    try:
        when = datetime.fromisoformat(at)
    except ValueError:
        raise KeyturnError(f"--at {at!r} is not an ISO date and time") from None
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    w.slots.set_clock_anchor(ClockAnchor(w.slots.db_now(), when, scale))
    out.print(f"schedule clock: {when.isoformat()} now, x{scale:g}", markup=False)


@rotations_app.command("retry-now")
def rotations_retry_now(
    rotation_id: IdArg = None, *, reason: ReasonOpt, latest: LatestOpt = None
) -> None:
    """Skip the backoff of a retrying rotation: its next attempt is now. Refused, with the
    reason, when it is not backing off (halted or paused: resume it instead)."""
    from keyturn.engine.operator import retry_now

    w = state.wiring()
    rid = _target_rotation(w.store, rotation_id, latest)
    rotation = retry_now(w.store, w.clock, rid, actor(), reason)
    out.print(
        f"retry-now applied; rotation {rid} ({rotation.state.value}) is due now; "
        + liveness.next_step_hint(w.store, w.clock.now()),
        markup=False,
    )


# -------------------------------------------------------------------------------- credentials


@credentials_app.command("list")
def credentials_list(
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """Managed credentials, the credential each points at, its key's age, its last rotation,
    its next due rotation and its policy."""
    from keyturn.cli.schedule import inventory

    w = state.wiring()
    creds = w.store.list_credentials()
    views = inventory(w, creds)
    if as_json:
        _print_json([{**render.credential_dict(c), **v} for c, v in zip(creds, views, strict=True)])
        return
    if not creds:
        sys.stdout.write("no managed credentials; add one with `keyturn credentials import`\n")
        return
    header = ("name", "kind", "provider", "key age", "last rotation", "next due", "policy",
              "credential")  # fmt: skip
    rows = [
        (c.name, c.kind, c.provider, render.age(v["key_age_seconds"]),
         f"{v['last_rotation'] or '-'} ({v['last_rotation_state']})" if v["last_rotation"] else "-",
         (v["next_rotation_at"] or "-")[:19], v["policy"] or "-", c.credential_uuid)
        for c, v in zip(creds, views, strict=True)
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [v.ljust(widths[i]) for i, v in enumerate(row[:-1])]
        out.print("  ".join([*cells, row[-1]]), markup=False)


@credentials_app.command("import")
def credentials_import(
    name: Annotated[
        str | None, typer.Argument(help="The credential's name in the config.", show_default=False)
    ] = None,
    kind: Annotated[
        str | None, typer.Option("--kind", help="An installed kind (`keyturn plugins`).")
    ] = None,
    provider: Annotated[
        str | None, typer.Option("--provider", help="A [providers.NAME] of the config.")
    ] = None,
    credential_id: Annotated[
        str | None, typer.Option("--credential-id", help="The provider's credential id.")
    ] = None,
    private_key_file: Annotated[
        Path | None, typer.Option("--private-key-file", help="Signing-key kinds: the key.")
    ] = None,
    secret_file: Annotated[
        Path | None, typer.Option("--secret-file", help="Secret kinds: the secret.")
    ] = None,
    credential_uuid: Annotated[
        str | None, typer.Option("--credential-uuid", help="The provider's credential uuid.")
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="Bearer token to store encrypted.")
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="Many at once: JSON lines or a TOML file of [[credentials]] with these "
            "options as keys (name, kind, provider, credential_id, ...).",
        ),
    ] = None,
) -> None:
    """Start managing credentials that exist already (deploy targets come from the config).
    Each is checked at the provider first: it exists, is active, and the key signs for it."""
    from keyturn.cli.setup import ImportEntry, import_credential, import_many, read_import_file

    w = state.wiring()
    if from_file is not None:
        given = [name, kind, provider, credential_id, private_key_file, secret_file]
        if any(v is not None for v in [*given, credential_uuid, token_file]):
            raise KeyturnError("--file takes the credentials from the file; pass no other option")
        imported, refused = import_many(w, read_import_file(from_file))
        for n in imported:
            out.print(f"managing {n}", markup=False)
        for line in refused:
            sys.stderr.write(f"keyturn: error: {line}\n")
        if refused:
            raise typer.Exit(1)
        return
    missing = [o for o, v in (("NAME", name), ("--kind", kind), ("--provider", provider),
               ("--credential-id", credential_id)) if v is None]  # fmt: skip
    if missing:
        raise KeyturnError(f"credentials import needs {', '.join(missing)} (or --file FILE)")
    if private_key_file is not None and secret_file is not None:
        raise KeyturnError("pass --private-key-file or --secret-file, not both")
    option, material = (
        ("--secret-file", secret_file)
        if secret_file is not None
        else ("--private-key-file", private_key_file)
    )
    assert name is not None and kind is not None and provider is not None
    assert credential_id is not None
    managed = import_credential(
        w,
        ImportEntry(
            name=name,
            kind=kind,
            provider=provider,
            credential_id=credential_id,
            credential_uuid=credential_uuid,
            material_file=material,
            material_option=option if material is not None else "",
            token_file=token_file,
        ),
    )
    out.print(f"managing {name} ({kind}, {managed.credential_uuid})")


# -------------------------------------------------------------------------------- reconcile


@app.command()
def reconcile(
    as_json: Annotated[bool, typer.Option("--json", help="The findings as JSON.")] = False,
) -> None:
    """Compare the provider with the store (read only); exit 1 when anything disagrees."""
    from keyturn.engine.reconcile import reconcile as run_reconcile

    w = state.wiring()
    w.checked_vault()
    findings = asyncio.run(run_reconcile(w.store, w, discovered()))
    if as_json:
        _print_json([f.as_dict() for f in findings])
    elif not findings:
        out.print("provider and store agree; no rotation needs a human")
    else:
        width = max(60, out.width)
        for f in findings:  # the message folded under its finding, never inside an id
            out.print(f"{f.kind:<11} {f.credential}", markup=False, highlight=False)
            for line in render.fold(f.message, width, " " * 4):
                out.print(line, markup=False, highlight=False, soft_wrap=True)
    if findings:
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------- keys


@keys_app.command("new-master")
def keys_new_master() -> None:
    """Print a fresh master key (store it in a 0600 file or KEYTURN_MASTER_KEY)."""
    from keyturn.adapters.vault import new_master_key

    sys.stdout.write(new_master_key() + "\n")


@keys_app.command("rotate-master")
def keys_rotate_master(
    new_key_file: Annotated[
        Path, typer.Option("--new-key-file", help="File with the new key (0600).")
    ],
) -> None:
    """Re-encrypt every stored key and secret under a new master key, in one transaction."""
    from keyturn.cli.setup import rotate_master

    count, new_id = rotate_master(state.wiring(), new_key_file)
    out.print(
        f"re-encrypted {count} secret(s) under master key {new_id}; now point "
        f"keys.master_key_file (or KEYTURN_MASTER_KEY) at {new_key_file}"
    )


# ----------------------------------------------------------------------------------- worker


@app.command()
def worker(
    until_idle: Annotated[
        bool,
        typer.Option(
            "--until-idle",
            help="Exit when nothing is due: 0, or 3 when this run left rotations halted.",
        ),
    ] = False,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", help="Rotations in flight.")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            help="Serve this worker's Prometheus metrics at http://HOST:PORT/metrics (0: any "
            "free port; the URL is printed).",
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Address the metrics listen on.")
    ] = "127.0.0.1",
) -> None:
    """Claim due rotations and advance them; SIGTERM/SIGINT stop cleanly."""
    from keyturn.engine.worker import Worker

    w = state.wiring()
    n = concurrency if concurrency is not None else w.config.worker.concurrency
    if n < 1:
        raise KeyturnError("--concurrency must be at least 1")
    from keyturn.engine.worker import default_owner

    metrics_server = _worker_metrics(w, metrics_host, metrics_port)
    owner = default_owner()
    runner = Worker(w.engine_deps(n), concurrency=n, owner=owner, notifier=w.deliverer(owner))

    async def go() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner.stop)
        await runner.run(until_idle=until_idle)

    asyncio.run(go())
    if metrics_server is not None:
        metrics_server.shutdown()
    halted = sorted(runner.halted)
    if until_idle and halted:
        left = [r for r in halted if w.store.get_rotation(r).halted_reason]
        if left:
            sys.stderr.write(
                f"keyturn: {len(left)} rotation(s) halted for a human: {', '.join(left)}; see "
                "`keyturn rotations list --status halted`\n"
            )
            raise typer.Exit(EXIT_HALTED)


def _worker_metrics(w: Any, host: str, port: int | None) -> Any:
    """With --metrics-port: count this process's steps and provider requests and serve them
    (the server, to shut down); a port that cannot be used is one line, exit 2."""
    if port is None:
        return None
    from keyturn.adapters.metrics import ProcessMetrics

    metrics = ProcessMetrics()
    try:
        server, bound = metrics.serve(host, port)
    except KeyturnError as exc:
        sys.stderr.write(f"keyturn: error: {exc}\n")
        raise typer.Exit(2) from None
    w.metrics = metrics
    shown = f"[{host}]" if ":" in host else host
    sys.stdout.write(f"keyturn worker: metrics on http://{shown}:{bound}/metrics\n")
    sys.stdout.flush()
    return server


# ---------------------------------------------------------------------------------- plugins


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="The installed plugins as JSON.")] = False,
) -> None:
    """The installed credential kinds, deploy targets and probes (entry points)."""
    installed = discovered().installed
    if as_json:
        _print_json([vars(i) for i in installed])
        return
    name_width = max((len(i.name) for i in installed), default=4)
    dist_width = max((len(i.distribution) for i in installed), default=4)
    for i in installed:
        group = i.group.removeprefix("keyturn.")
        out.print(
            f"{group:<8} {i.name:<{name_width}}  {i.distribution:<{dist_width}}  {i.description}",
            markup=False,
        )


# ------------------------------------------------------------------------------- init, demo


def _mount_quickstart() -> None:
    from keyturn.quickstart.cli import mount

    mount(app, out)


def _mount_sandbox() -> None:
    _LazyGroup.lazy["sandbox"] = ("keyturn.sandbox.cli:app", "A local Dfns-compatible sandbox.")


def _mount_receiver() -> None:
    _LazyGroup.lazy["receiver"] = ("keyturn.receiver:app", "The reference event receiver.")


def _mount_serve() -> None:
    from keyturn.cli.serve import mount

    mount(app, out)
    _LazyGroup.lazy["tokens"] = (
        "keyturn.cli.serve:tokens_app",
        "Bearer tokens of the HTTP API (`keyturn serve`).",
    )
    _LazyGroup.lazy["notifications"] = (
        "keyturn.cli.notifications:app",
        "Notifications to on-call: the outbox's deliveries and their attempts.",
    )


def _mount_plugin_commands() -> None:
    """Commands plugins add (entry points of the ``keyturn.commands`` group: a Typer app each,
    mounted under the entry point's name). A plugin's command reaches keyturn through
    ``keyturn.plugin.operations()``."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="keyturn.commands"):
        try:
            sub = ep.load()
        except Exception as exc:  # a broken plugin must not break every command
            sys.stderr.write(f"keyturn: warning: plugin commands {ep.name} not loaded ({exc})\n")
            continue
        if isinstance(sub, typer.Typer):
            app.add_typer(sub, name=ep.name)


def _reflowed(doc: str) -> str:
    """A docstring as help: each paragraph's lines joined (the terminal wraps them), lists and
    indented blocks kept as they are."""
    import inspect

    out = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        lines = para.splitlines()
        kept = any(ln.startswith((" ", "-", "*")) for ln in lines)
        out.append(para if kept else " ".join(ln.strip() for ln in lines))
    return "\n\n".join(out)


def _reflow_help(t: typer.Typer) -> None:
    for c in t.registered_commands:
        if c.help is None and c.callback is not None and c.callback.__doc__:
            c.help = _reflowed(c.callback.__doc__)
    for g in t.registered_groups:
        if g.typer_instance is not None:
            _reflow_help(g.typer_instance)


_mount_quickstart()
_mount_plugin_commands()
_mount_sandbox()
_mount_receiver()
_mount_serve()
mount_workers(app, out)
_reflow_help(app)


#: Exit status of a failure keyturn did not foresee (a bug): sysexits' EX_SOFTWARE.
EXIT_INTERNAL = 70
#: Set to 1 to see the traceback of such a failure.
TRACEBACK_ENV = "KEYTURN_TRACEBACK"


def _unforeseen(exc: Exception) -> str:
    """One line for a failure no command turned into a KeyturnError. A file or network error
    names its file and cause; anything else is a bug, said so, never with its arguments (they
    may hold material)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" {exc.filename}" if exc.filename else ""
        return f"{exc.strerror.lower()}:{where} (check the path, its permissions or the service)"
    return (
        f"unexpected {type(exc).__name__}: this is a bug in keyturn; rerun with "
        f"{TRACEBACK_ENV}=1 to see where, and report it"
    )


def _one_line(text: str) -> str:
    return " ".join(text.split()).rstrip(".")


def main() -> None:
    try:
        rc = app(standalone_mode=False)
    except KeyturnError as exc:
        sys.stderr.write(f"keyturn: error: {exc}\n")
        sys.exit(1)
    except typer.Abort:
        sys.stderr.write("keyturn: aborted\n")
        sys.exit(130)
    except Exception as exc:
        # Usage errors (typer vendors its own click, so match by shape, not by class).
        fmt = getattr(exc, "format_message", None)
        code = getattr(exc, "exit_code", None)
        if fmt is not None and isinstance(code, int):
            ctx = getattr(exc, "ctx", None)
            where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            sys.stderr.write(f"keyturn: error: {_one_line(fmt())}{where}\n")
            sys.exit(code)
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        sys.stderr.write(f"keyturn: error: {_unforeseen(exc)}\n")
        sys.exit(1 if isinstance(exc, OSError) else EXIT_INTERNAL)
    if isinstance(rc, int) and rc:
        sys.exit(rc)
