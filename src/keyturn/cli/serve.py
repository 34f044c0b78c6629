"""`keyturn serve` (the HTTP API, optionally with a worker in the same process) and
`keyturn tokens` (the API's bearer tokens). The composition root of the web layer: the one
place that hands the app its store, its readiness check and its rollback planner."""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from keyturn.domain.errors import KeyturnError

if TYPE_CHECKING:
    from rich.console import Console

    from keyturn.cli.wiring import Wiring
    from keyturn.domain.model import ManagedCredential
    from keyturn.engine.run import EngineDeps
    from keyturn.web.app import Backend

tokens_app = typer.Typer(
    help="Bearer tokens of the HTTP API (`keyturn serve`).",
    no_args_is_help=True,
    add_completion=False,
)


def backend(w: Wiring, deps: EngineDeps | None = None) -> Backend:  # noqa: C901 (closures)
    """The app's ports and callables, from the configuration's wiring (with ``[serve]
    metrics`` not off, set ``w.metrics`` before making `deps`, so its worker is counted)."""
    from keyturn.adapters.store.migrate import current_revision, head_revision
    from keyturn.engine.registry import discovered
    from keyturn.web.app import Backend

    store = w.store  # refuses an unmigrated database in one line, before anything listens
    made: list[EngineDeps] = [deps] if deps is not None else []

    def engine_deps() -> EngineDeps:
        if not made:
            made.append(w.engine_deps())
        return made[0]

    def rollback_plan(rotation_id: str) -> dict[str, Any]:
        from keyturn.cli import _plan_json, _rollback_plan

        return _plan_json(*_rollback_plan(w, rotation_id))

    def plan(until: str | None, credential: str | None) -> dict[str, Any]:
        from keyturn.cli import _until
        from keyturn.cli.schedule import plan_fleet

        now = w.schedule_time.now()
        try:
            horizon = _until(until, now)
        except KeyturnError as exc:
            raise KeyturnError(str(exc).replace("--until", "until", 1)) from None
        except (OverflowError, ValueError):
            raise KeyturnError(
                f"until {until!r} is out of range; give a date or e.g. 30d"
            ) from None
        planned, notes = plan_fleet(w, until=horizon, credential=credential)
        return {"now": now.isoformat(), "rotations": [p.as_dict() for p in planned],
                "notes": notes}  # fmt: skip

    def inventory(creds: Sequence[ManagedCredential]) -> list[dict[str, Any]]:
        from keyturn.cli.schedule import inventory as rows

        return rows(w, creds)

    def configured(name: str) -> dict[str, list[dict[str, str]]]:
        cfg = w.config.configured(name)
        if cfg is None:
            return {"targets": [], "probes": []}
        deps = engine_deps()
        # built as a worker builds them, for their names (building one calls nothing)
        targets = deps.targets(name)
        probes = deps.probes(name)
        return {
            "targets": [
                {"type": t.type, "name": str(getattr(built, "name", t.name or t.type))}
                for t, built in zip(cfg.targets, targets, strict=True)
            ],
            "probes": [
                {"type": p.type, "name": str(getattr(built, "name", p.name or p.type))}
                for p, built in zip(cfg.probes, probes, strict=True)
            ],
        }

    url, source = w.config.database.url, w.config.database_url_from
    head = head_revision()

    def readiness() -> str | None:
        try:
            current = current_revision(url, source=source)
        except KeyturnError as exc:
            return str(exc)
        if current != head:
            return (
                f"the database is not migrated (at {current or 'empty'}, needs {head}); run "
                "`keyturn db upgrade`"
            )
        return None

    mode = w.config.serve.metrics
    scrape = None
    if mode != "off":
        from keyturn.engine.campaigns import progress
        from keyturn.web.metrics import FleetCollector, scraper

        registry = discovered()

        def campaigns(_now: datetime) -> dict[str, dict[str, int]]:
            # "overdue" is on the schedule's clock, as the CLI's progress counts it
            return progress(store, registry, w.now())

        collectors: list[Any] = [FleetCollector(store, w.clock, campaigns)]
        if w.metrics is not None:
            collectors.append(w.metrics.registry)
        scrape = scraper(collectors)
    return Backend(
        store=store,
        access=store,
        registry=discovered(),
        clock=w.clock,
        lease_seconds=w.config.worker.lease_seconds,
        max_attempts=w.config.worker.max_attempts,
        engine_deps=engine_deps,
        rollback_plan=rollback_plan,
        readiness=readiness,
        head_revision=head,
        plan=plan,
        inventory=inventory,
        configured=configured,
        metrics=mode,
        scrape=scrape,
        schedule_now=w.now,
    )


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a taken port is one clear line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise KeyturnError(f"--host {host!r} cannot be resolved ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family in (socket.AF_INET, socket.AF_INET6):
        # inherited by accepted sockets: a response's head and body (two writes) never wait
        # for a delayed ACK on a keep-alive connection
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise KeyturnError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --host or --port"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _cannot_start(problem: str) -> NoReturn:
    """A server that cannot start exits 2 (as the sandbox and the receiver do)."""
    sys.stderr.write(f"keyturn: error: {problem}\n")
    raise typer.Exit(2)


def user_pages(w: Wiring) -> Any | None:
    """The pages of every kind that has pages for people (each under /<kind>), or None."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from keyturn.engine.registry import discovered

    mounts = []
    for name, kind in sorted(discovered().kinds.items()):
        pages = kind.user_app(w)
        if pages is not None:
            mounts.append(Mount(f"/{name}", app=pages))
    return Starlette(routes=mounts) if mounts else None


def _user_server(w: Wiring, host: str, port: int) -> tuple[Any, socket.socket]:
    import uvicorn

    pages = user_pages(w)
    if pages is None:
        _cannot_start("--user-port: no installed kind has pages for users")
    try:
        sock = _listen(host, port)
    except KeyturnError as exc:
        _cannot_start(str(exc).replace("--port", "--user-port"))
    config = uvicorn.Config(pages, log_config=None, access_log=False, lifespan="off")
    return uvicorn.Server(config), sock


def serve(
    w: Wiring,
    out: Console,
    *,
    host: str,
    port: int,
    worker: bool,
    concurrency: int | None,
    user_port: int | None = None,
) -> None:
    import asyncio
    import signal

    import uvicorn

    from keyturn.engine.worker import Worker
    from keyturn.web.app import create_app

    if not 0 <= port <= 65535:
        _cannot_start(f"--port {port} is not a TCP port; use 1-65535, or 0 for a free one")
    n = concurrency if concurrency is not None else w.config.worker.concurrency
    if n < 1:
        raise KeyturnError("--concurrency must be at least 1")
    if w.config.serve.metrics != "off":
        from keyturn.adapters.metrics import ProcessMetrics

        w.metrics = ProcessMetrics()  # this process's steps and provider requests, on /metrics
    # made now: a verb carried out at once needs the engine (and the master key), so a missing
    # key is one line at start-up, not a failed request later
    deps = w.engine_deps(n) if worker else w.engine_deps()
    app = create_app(backend(w, deps))
    try:
        sock = _listen(host, port)
    except KeyturnError as exc:
        _cannot_start(str(exc))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    users, user_sock = _user_server(w, host, user_port) if user_port is not None else (None, None)

    from keyturn.engine.worker import default_owner

    owner = default_owner()
    # the outbox is delivered by the worker when there is one, else by a loop of its own
    notifier = w.deliverer(owner if worker else f"serve:{owner}")
    stopping = asyncio.Event()

    async def go() -> None:
        runner = Worker(deps, concurrency=n, owner=owner, notifier=notifier) if worker else None
        task = asyncio.create_task(runner.run()) if runner is not None else None
        notifying = (
            asyncio.create_task(notifier.run(stopping))
            if notifier is not None and runner is None
            else None
        )
        if task is not None:
            # a worker that dies takes the service down with it (so a supervisor restarts both)
            task.add_done_callback(lambda _: setattr(server, "should_exit", True))
        user_task = None
        if users is not None and user_sock is not None:
            user_task = asyncio.create_task(users.serve(sockets=[user_sock]))
            user_task.add_done_callback(lambda _: setattr(server, "should_exit", True))
            out.print(
                f"keyturn serve: user pages on http://{host}:{user_sock.getsockname()[1]}",
                markup=False,
                highlight=False,
            )
        out.print(
            f"keyturn serve: listening on http://{host}:{bound}"
            + (f" with a worker ({runner.owner})" if runner is not None else ""),
            markup=False,
            highlight=False,
        )
        sys.stdout.flush()
        try:
            await server.serve(sockets=[sock])
        finally:
            if users is not None and user_task is not None:
                users.should_exit = True
                await user_task
            if runner is not None and task is not None:
                runner.stop()
                await task
            if notifying is not None:
                stopping.set()
                await notifying

    # uvicorn handles SIGTERM while it serves and raises it again once it has stopped: then
    # (and before it serves) SIGTERM asks for the same clean stop, so the exit status is 0.
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    asyncio.run(go())


def mount(app: typer.Typer, out: Console) -> None:
    @app.command("serve")
    def serve_command(
        host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="TCP port (0: any free one).")] = 8000,
        worker: Annotated[
            bool, typer.Option("--worker", help="Also run a worker in this process.")
        ] = False,
        concurrency: Annotated[
            int | None, typer.Option("--concurrency", help="The worker's rotations in flight.")
        ] = None,
        user_port: Annotated[
            int | None,
            typer.Option(
                "--user-port",
                help="Also serve the pages for users (links a rotation sends them) on this "
                "port: their own origin, no operator routes (0: any free one).",
            ),
        ] = None,
    ) -> None:
        """The HTTP API (OpenAPI at /openapi.json; /healthz, /readyz), the dashboard (/ui) and,
        with --user-port, the pages for users on a listener of their own; SIGTERM stops it."""
        from keyturn.cli import state

        serve(
            state.wiring(),
            out,
            host=host,
            port=port,
            worker=worker,
            concurrency=concurrency,
            user_port=user_port,
        )


# ------------------------------------------------------------------------------------ tokens


@tokens_app.command("create")
def tokens_create(
    role: Annotated[str, typer.Option("--role", help="viewer, operator or admin.")],
    name: Annotated[str, typer.Option("--name", help="Who uses it (the actor in the timeline).")],
) -> None:
    """Create a token and print it, once: only its SHA-256 is stored."""
    from keyturn.cli import state
    from keyturn.cli.wiring import actor
    from keyturn.engine.access import create_token, parse_role

    chosen = parse_role(role)
    w = state.wiring()
    record, token = create_token(w.store, w.clock, name=name, role=chosen, actor=actor())
    sys.stdout.write(token + "\n")
    sys.stderr.write(
        f"keyturn: token {record.name} ({record.role.value}) created; it is shown only this "
        "once: keep it now (send it as Authorization: Bearer TOKEN)\n"
    )


@tokens_app.command("list")
def tokens_list(
    as_json: Annotated[bool, typer.Option("--json", help="One object per token.")] = False,
) -> None:
    """Every token (revoked ones too): name, role, created, by whom, revoked."""
    from keyturn.cli import state
    from keyturn.cli.render import dump, when

    tokens = state.wiring().store.list_tokens()
    rows = [
        {
            "name": t.name,
            "role": t.role.value,
            "created_at": t.created_at.isoformat() if t.created_at else None,
            "created_by": t.created_by,
            "revoked_at": t.revoked_at.isoformat() if t.revoked_at else None,
        }
        for t in tokens
    ]
    if as_json:
        sys.stdout.write(dump(rows) + "\n")
        return
    if not rows:
        sys.stdout.write("no API tokens; create one with `keyturn tokens create`\n")
        return
    header = ("name", "role", "created", "created by", "revoked")
    cells = [header] + [
        (t.name, t.role.value, when(t.created_at), t.created_by, when(t.revoked_at)) for t in tokens
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for c in cells:
        sys.stdout.write("  ".join(v.ljust(widths[i]) for i, v in enumerate(c)).rstrip() + "\n")


@tokens_app.command("revoke")
def tokens_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.", show_default=False)],
) -> None:
    """Revoke a token: the API refuses it (401) from now on."""
    from keyturn.cli import state

    w = state.wiring()
    revoked = w.store.revoke_token(name, w.clock.now())
    sys.stdout.write(f"token {revoked.name} revoked\n")
