"""`keyturn demo`: a real rotation against a local sandbox, checked end to end."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.text import Text

from keyturn import logs
from keyturn.cli import render
from keyturn.cli.setup import SANDBOX_SA, init_workdir
from keyturn.cli.wiring import Wiring, actor
from keyturn.config import load_config
from keyturn.domain.lifecycle import State
from keyturn.engine.operator import start_rotation
from keyturn.engine.worker import Worker

STEPS = [State.PENDING, State.NEW_ADDED, State.VERIFIED, State.OLD_DEACTIVATED]


def _progress(state: State, elapsed: float, status: str) -> Text:
    text = Text()
    reached = STEPS.index(state) if state in STEPS else -1
    for i, s in enumerate(STEPS):
        style = "bold green" if i <= reached else "dim"
        text.append(f" {'●' if i <= reached else '○'} {s.value}", style=style)
        if i < len(STEPS) - 1:
            text.append(" →", style="dim")
    text.append(f"   {status}  {elapsed:4.1f}s")
    return text


def run_demo(console: Console) -> bool:
    from keyturn.sandbox.testing import start_sandbox

    logs.configure("console", "warning")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="keyturn-demo-") as tmp:
        root = Path(tmp)
        console.print("[bold]keyturn demo[/bold]: starting a local Dfns sandbox ...")
        with start_sandbox(root / "sandbox") as sandbox:
            console.print(f"  sandbox at {sandbox.base_url}")
            config_path = init_workdir(root / "work", sandbox.state_dir / "bootstrap.json")
            console.print(f"  initialised {config_path.parent} (SQLite, master key, {SANDBOX_SA})")
            w = Wiring(load_config(config_path))
            before = w.store.get_credential(SANDBOX_SA)
            cfg = w.config.credential(SANDBOX_SA)
            rotation = start_rotation(
                w.store,
                w.clock,
                credential=SANDBOX_SA,
                reason="keyturn demo",
                actor=actor(),
                options={"algorithm": cfg.algorithm, "via": cfg.registration},
            )
            console.print(f"  rotation {rotation.id} of {SANDBOX_SA} created; running a worker")
            worker = Worker(w.engine_deps(), concurrency=4)

            async def go() -> None:
                task = asyncio.create_task(worker.run(until_idle=True))
                with Live(console=console, refresh_per_second=12, transient=False) as live:
                    while True:
                        current = await asyncio.to_thread(w.store.get_rotation, rotation.id)
                        live.update(
                            _progress(
                                current.state,
                                time.monotonic() - started,
                                render.status_of(current),
                            )
                        )
                        if task.done():
                            break
                        await asyncio.sleep(0.08)
                await task

            asyncio.run(go())
            final = w.store.get_rotation(rotation.id)
            checks = asyncio.run(_check(w, before.credential_uuid, final.data))
            checks.insert(
                0, (final.state is State.OLD_DEACTIVATED, f"rotation ended in {final.state.value}")
            )
            console.print("\n[bold]timeline[/bold]")
            console.print(render.timeline_table(w.store.events(rotation.id)))
            console.print("\n[bold]checks through the sandbox[/bold]")
            for ok, what in checks:
                console.print(f"  {'[green]✔[/green]' if ok else '[red]✘[/red]'} {what}")
            ok = all(ok for ok, _ in checks)
            elapsed = time.monotonic() - started
            verdict = "[green]demo passed[/green]" if ok else "[red]demo FAILED[/red]"
            console.print(f"\n{verdict} in {elapsed:.1f}s; cleaning up")
            return ok


async def _check(w: Wiring, old_uuid: str, data: dict[str, object]) -> list[tuple[bool, str]]:
    new_uuid = str(data.get("new_credential_uuid"))
    provider = w.provider_for(SANDBOX_SA)
    try:
        creds = {c.credential_uuid: c for c in await provider.list_credentials()}
    finally:
        await provider.aclose()
    old, new = creds.get(old_uuid), creds.get(new_uuid)
    checks = [
        (old is not None and not old.is_active, f"old credential {old_uuid} is inactive"),
        (new is not None and new.is_active, f"new credential {new_uuid} is active"),
    ]
    now = w.store.get_credential(SANDBOX_SA)
    checks.append((now.credential_uuid == new_uuid, f"{SANDBOX_SA} now points at {new_uuid}"))
    expected_public = "".join(str(data.get("new_public_key", "")).split())
    for target in w.targets_for(SANDBOX_SA):
        held = target.read_back()
        held_public = "".join(w.keys.public_pem(held.private_key_pem).split())
        checks.append(
            (
                held_public == expected_public and held.credential_uuid == new_uuid,
                f"deploy target {target.name} holds the new key and credential id",
            )
        )
    return checks
