"""The `keyturn` command line: the contract other tools rely on (keep these names).

Start-up matters (an on-call engineer runs many commands): importing this module must stay
cheap. SQLAlchemy, Alembic, pydantic and the plugins load when a command first needs the
config or the store (keyturn.config and keyturn.cli.wiring import them where they are used),
and the sandbox and receiver apps (a web stack) only when one of their commands runs.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from keyturn.cli import render
from keyturn.cli.wiring import Wiring, actor
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
        cmd = typer.main.get_command(sub_app)
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
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
rotations_app = typer.Typer(
    help="See, resume, pause, cancel or roll back rotations.", no_args_is_help=True
)
credentials_app = typer.Typer(help="Managed credentials.", no_args_is_help=True)
keys_app = typer.Typer(
    help="The master key that encrypts stored keys and secrets.", no_args_is_help=True
)
app.add_typer(db_app, name="db")
app.add_typer(rotations_app, name="rotations")
app.add_typer(credentials_app, name="credentials")
app.add_typer(keys_app, name="keys")

out = Console(highlight=False, soft_wrap=True)


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


@app.command()
def rotate(
    name: Annotated[str, typer.Argument(help="Managed credential name.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")] = "scheduled rotation",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Start a rotation of a managed credential; a worker carries it out."""
    w = state.wiring()
    w.store.get_credential(name)  # an unknown name is a clear error before anything else
    w.checked_vault()
    rotation = w.start_rotation(name, reason=reason, actor=actor())
    if as_json:
        _print_json({"id": rotation.id})
    else:
        out.print(rotation.id)


# ---------------------------------------------------------------------------------- rotations


@rotations_app.command("list")
def rotations_list(
    state_filter: Annotated[str | None, typer.Option("--state", help="Only this state.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Rotations, newest first."""
    wanted: State | None = None
    if state_filter is not None:
        try:
            wanted = State(state_filter)
        except ValueError:
            raise KeyturnError(
                f"--state {state_filter!r} is not a state; use one of "
                + ", ".join(s.value for s in State)
            ) from None
    rotations = state.wiring().store.list_rotations(state=wanted)
    if as_json:
        _print_json([render.rotation_dict(r) for r in rotations])
    elif rotations:
        out.print(render.rotations_table(rotations))
    else:
        out.print("no rotations")


@rotations_app.command("show")
def rotations_show(
    rotation_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """State, lease, attempts, halted reason, action records and the timeline."""
    store = state.wiring().store
    rotation = store.get_rotation(rotation_id)
    events = store.events(rotation_id)
    actions = store.actions(rotation_id)
    if as_json:
        _print_json(
            {
                **render.rotation_dict(rotation),
                "actions": [render.action_dict(a) for a in actions],
                "events": [render.event_dict(e) for e in events],
            }
        )
    else:
        render.show_rotation(out, rotation, events, actions)


def _operator(action: OperatorAction, rotation_id: str, reason: str) -> None:
    from keyturn.engine.operator import request_action

    w = state.wiring()
    deps = w.engine_deps()
    rotation, applied = asyncio.run(request_action(deps, rotation_id, action, actor(), reason))
    if applied is None:
        until = rotation.lease_expires_at.isoformat() if rotation.lease_expires_at else "?"
        out.print(
            f"{action.value} requested; the worker holding rotation {rotation_id} "
            f"({rotation.lease_owner}, lease until {until}) carries it out at its next action "
            "boundary, or the next worker does once that lease expires"
        )
        return
    if applied.outcome != "applied":
        raise KeyturnError(f"{action.value} of rotation {rotation_id} {applied.outcome}")
    follow = ""
    if not rotation.finished and not rotation.paused:
        follow = "; a worker carries on from here"
    out.print(
        f"{action.value} applied; rotation {rotation_id} is now {rotation.state.value} "
        f"({render.status_of(rotation)}){follow}"
    )


@rotations_app.command("resume")
def rotations_resume(
    rotation_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: Annotated[str, typer.Option("--reason")],
) -> None:
    """Resume a halted or paused rotation with a fresh retry budget."""
    _operator(OperatorAction.RESUME, rotation_id, reason)


@rotations_app.command("rollback")
def rotations_rollback(
    rotation_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: Annotated[str, typer.Option("--reason")],
) -> None:
    """Undo a rotation: old credential active and deployed, new one inactive."""
    _operator(OperatorAction.ROLLBACK, rotation_id, reason)


@rotations_app.command("cancel")
def rotations_cancel(
    rotation_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: Annotated[str, typer.Option("--reason")],
) -> None:
    """Cancel a rotation that has not touched the provider yet."""
    _operator(OperatorAction.CANCEL, rotation_id, reason)


@rotations_app.command("pause")
def rotations_pause(
    rotation_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: Annotated[str, typer.Option("--reason")],
) -> None:
    """Stop working on a rotation at its next action boundary until resumed."""
    _operator(OperatorAction.PAUSE, rotation_id, reason)


# -------------------------------------------------------------------------------- credentials


@credentials_app.command("list")
def credentials_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Managed credentials and the credential each currently points at."""
    creds = state.wiring().store.list_credentials()
    if as_json:
        _print_json([render.credential_dict(c) for c in creds])
        return
    if not creds:
        out.print("no managed credentials; add one with `keyturn credentials import`")
        return
    for c in creds:
        out.print(f"{c.name}  {c.kind}  {c.provider}  {c.credential_uuid}  {c.algorithm}")


@credentials_app.command("import")
def credentials_import(
    name: Annotated[str, typer.Argument()],
    kind: Annotated[str, typer.Option("--kind", help="An installed kind (`keyturn plugins`).")],
    provider: Annotated[str, typer.Option("--provider")],
    credential_id: Annotated[str, typer.Option("--credential-id")],
    private_key_file: Annotated[
        Path | None, typer.Option("--private-key-file", help="Signing-key kinds: the key.")
    ] = None,
    secret_file: Annotated[
        Path | None, typer.Option("--secret-file", help="Secret kinds: the secret.")
    ] = None,
    credential_uuid: Annotated[str | None, typer.Option("--credential-uuid")] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="Bearer token to store encrypted.")
    ] = None,
) -> None:
    """Start managing a credential that exists already (deploy targets come from the config)."""
    from keyturn.cli.setup import import_credential

    if private_key_file is not None and secret_file is not None:
        raise KeyturnError("pass --private-key-file or --secret-file, not both")
    option, material = (
        ("--secret-file", secret_file)
        if secret_file is not None
        else ("--private-key-file", private_key_file)
    )
    w = state.wiring()
    import_credential(
        w,
        name=name,
        kind=kind,
        provider=provider,
        material_file=material,
        material_option=option if material is not None else "",
        credential_id=credential_id,
        credential_uuid=credential_uuid,
        token_file=token_file,
    )
    out.print(f"managing {name} ({kind}, {credential_uuid or credential_id})")


# -------------------------------------------------------------------------------- reconcile


@app.command()
def reconcile(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Compare the provider with the store (read only); exit 1 when anything disagrees."""
    from keyturn.engine.reconcile import reconcile as run_reconcile

    w = state.wiring()
    w.checked_vault()
    findings = asyncio.run(run_reconcile(w.store, w, discovered()))
    if as_json:
        _print_json([f.as_dict() for f in findings])
    elif not findings:
        out.print("provider and store agree: no orphans, no mismatches")
    else:
        for f in findings:
            out.print(f"{f.kind:<11} {f.credential}: {f.message}", markup=False)
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
        bool, typer.Option("--until-idle", help="Exit 0 when nothing is due.")
    ] = False,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", help="Rotations in flight.")
    ] = None,
) -> None:
    """Claim due rotations and advance them; SIGTERM/SIGINT stop cleanly."""
    from keyturn.engine.worker import Worker

    w = state.wiring()
    n = concurrency if concurrency is not None else w.config.worker.concurrency
    if n < 1:
        raise KeyturnError("--concurrency must be at least 1")
    runner = Worker(w.engine_deps(n), concurrency=n)

    async def go() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner.stop)
        await runner.run(until_idle=until_idle)

    asyncio.run(go())


# ---------------------------------------------------------------------------------- plugins


@app.command()
def plugins(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
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


_mount_quickstart()
_mount_sandbox()
_mount_receiver()


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
        if fmt is None or not isinstance(code, int):
            raise
        ctx = getattr(exc, "ctx", None)
        where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        sys.stderr.write(f"keyturn: error: {fmt()}{where}\n")
        sys.exit(code)
    except json.JSONDecodeError as exc:  # pragma: no cover - defensive
        sys.stderr.write(f"keyturn: error: invalid JSON ({exc})\n")
        sys.exit(1)
    if isinstance(rc, int) and rc:
        sys.exit(rc)
