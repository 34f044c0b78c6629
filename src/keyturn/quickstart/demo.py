"""`keyturn demo`: real rotations of all three kinds against a local sandbox that emits webhook
events throughout, checked end to end through the sandbox and the receiver."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from keyturn import logs
from keyturn.cli import render
from keyturn.cli.wiring import Wiring, actor
from keyturn.config import load_config
from keyturn.domain.lifecycle import State
from keyturn.domain.model import Rotation
from keyturn.engine.worker import Worker
from keyturn.plugin import dfns_key_session, dfns_webhook_session
from keyturn.quickstart.init import (
    SANDBOX_PAT,
    SANDBOX_SA,
    SANDBOX_WEBHOOK,
    enable_webhook_when_loaded,
    init_workdir,
)
from keyturn.targets.files import PathConfig

STEPS = [State.PENDING, State.NEW_ADDED, State.VERIFIED, State.OLD_DEACTIVATED]
NAMES = [SANDBOX_SA, SANDBOX_PAT, SANDBOX_WEBHOOK]
EVENT_RATE = 50.0

Check = tuple[bool, str]


def _progress(rotations: list[Rotation], elapsed: float, events: str) -> Group:
    lines = []
    for r in rotations:
        text = Text(f"{r.credential:<24}")
        reached = STEPS.index(r.state) if r.state in STEPS else -1
        for i, s in enumerate(STEPS):
            style = "bold green" if i <= reached else "dim"
            text.append(f" {'●' if i <= reached else '○'} {s.value}", style=style)
            if i < len(STEPS) - 1:
                text.append(" →", style="dim")
        text.append(f"   {render.status_of(r)}")
        lines.append(text)
    lines.append(Text(f"{elapsed:5.1f}s   {events}", style="dim"))
    return Group(*lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_demo(console: Console) -> bool:
    from keyturn.receiver import start_receiver
    from keyturn.sandbox.testing import start_sandbox

    logs.configure("console", "warning")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="keyturn-demo-") as tmp:
        root = Path(tmp)
        console.print("[bold]keyturn demo[/bold]: starting a local Dfns sandbox ...")
        with start_sandbox(root / "sandbox") as sandbox:
            port = _free_port()
            config_path = init_workdir(
                root / "work", sandbox.state_dir / "bootstrap.json", f"http://127.0.0.1:{port}"
            )
            console.print(f"  sandbox at {sandbox.base_url}; initialised {config_path.parent}")
            w = Wiring(load_config(config_path))
            target = w.config.credential(SANDBOX_WEBHOOK).targets[0]
            assert isinstance(target, PathConfig)
            secrets_file = target.path
            with start_receiver(secrets_file, port=port) as receiver:
                # the webhook was created disabled; enabled once the receiver holds its secret
                why = enable_webhook_when_loaded(config_path)
                if why is not None:
                    console.print(f"[red]{why}[/red]")
                    return False
                console.print(
                    f"  webhook receiver at {receiver.url}; the sandbox emits "
                    f"{EVENT_RATE:.0f} events/s"
                )
                sandbox.set_event_rate(EVENT_RATE)
                before = {n: w.store.get_credential(n) for n in NAMES}
                ids = [
                    w.start_rotation(name, reason="keyturn demo", actor=actor()).id
                    for name in NAMES
                ]
                worker = Worker(w.engine_deps(4), concurrency=4)

                async def go() -> None:
                    task = asyncio.create_task(worker.run(until_idle=True))
                    with Live(console=console, refresh_per_second=10) as live:
                        while True:
                            rotations = [
                                await asyncio.to_thread(w.store.get_rotation, i) for i in ids
                            ]
                            state = await asyncio.to_thread(receiver.state)
                            live.update(
                                _progress(
                                    rotations,
                                    time.monotonic() - started,
                                    f"receiver: {state['accepted']} accepted, "
                                    f"{state['rejected']} rejected",
                                )
                            )
                            if task.done():
                                break
                            await asyncio.sleep(0.1)
                    await task

                asyncio.run(go())
                sandbox.set_event_rate(0)
                time.sleep(1.0)  # deliveries already in flight
                finals = [w.store.get_rotation(i) for i in ids]
                checks: list[Check] = [
                    (
                        r.state is State.OLD_DEACTIVATED,
                        f"{r.credential}: rotation ended in {r.state}",
                    )
                    for r in finals
                ]
                checks += asyncio.run(_check_keys(w, finals[:2]))
                checks += asyncio.run(
                    _check_webhook(w, before[SANDBOX_WEBHOOK].credential_id, finals[2])
                )
                checks += _check_traffic(sandbox.state(), receiver.state())
            console.print("\n[bold]timelines[/bold]")
            for r in finals:
                console.print(f"[bold]{r.credential}[/bold] {r.id}")
                render.print_timeline(console, w.store.events(r.id))
            console.print("\n[bold]checks through the sandbox and the receiver[/bold]")
            for ok, what in checks:
                console.print(f"  {'[green]✔[/green]' if ok else '[red]✘[/red]'} {what}")
            ok = all(ok for ok, _ in checks)
            verdict = "[green]demo passed[/green]" if ok else "[red]demo FAILED[/red]"
            console.print(f"\n{verdict} in {time.monotonic() - started:.1f}s; cleaning up")
            return ok


async def _check_keys(w: Wiring, finals: list[Rotation]) -> list[Check]:
    checks: list[Check] = []
    for r in finals:
        name = r.credential
        old_uuid = str(r.data.get("old_credential_uuid"))
        new_uuid = str(r.data.get("new_credential_uuid"))
        provider = await w.provider_session(dfns_key_session, name)
        try:
            creds = {c.credential_uuid: c for c in await provider.list_credentials()}
        finally:
            await provider.aclose()
        old, new = creds.get(old_uuid), creds.get(new_uuid)
        checks.append(
            (old is not None and not old.is_active, f"{name}: old credential {old_uuid} inactive")
        )
        checks.append(
            (new is not None and new.is_active, f"{name}: new credential {new_uuid} active")
        )
        expected = "".join(str(r.data.get("new_public_key", "")).split())
        for target in w.engine_deps().targets(name):
            held = await target.read_back()
            same = "".join(w.keys.public_pem(held.private_key_pem).split()) == expected
            checks.append(
                (
                    same and held.credential_uuid == new_uuid,
                    f"{name}: {target.name} holds the new key and credential id",
                )
            )
    return checks


async def _check_webhook(w: Wiring, old_id: str, r: Rotation) -> list[Check]:
    new_id = str(r.data.get("new_webhook_id"))
    provider = await w.provider_session(dfns_webhook_session, SANDBOX_SA, with_key=True)
    try:
        old = await provider.get_webhook(old_id)
        new = await provider.get_webhook(new_id)
    finally:
        await provider.aclose()
    checks: list[Check] = [
        (old is None, f"{SANDBOX_WEBHOOK}: old webhook {old_id} deleted"),
        (
            new is not None and new.status == "Enabled",
            f"{SANDBOX_WEBHOOK}: new webhook {new_id} enabled",
        ),
    ]
    for target in w.engine_deps().targets(SANDBOX_WEBHOOK):
        _version, secrets = await target.read_back()
        checks.append((len(secrets) == 1, f"{SANDBOX_WEBHOOK}: {target.name} holds one secret"))
    return checks


def _check_traffic(
    sandbox_state: dict[str, object], receiver_state: dict[str, object]
) -> list[Check]:
    deliveries = sandbox_state.get("deliveries")
    assert isinstance(deliveries, dict)
    delivered = sum(int(d["delivered"]) for d in deliveries.values())
    failed = sum(int(d["failed"]) for d in deliveries.values())
    accepted = int(str(receiver_state["accepted"]))
    rejected = int(str(receiver_state["rejected"]))
    return [
        (
            delivered > 0 and failed == 0,
            f"events: {delivered} delivered by the sandbox, {failed} failed",
        ),
        (
            rejected == 0 and accepted >= delivered,
            f"events: {accepted} accepted by the receiver, {rejected} rejected",
        ),
        (
            len(deliveries) >= 2,
            f"events reached {len(deliveries)} webhooks (the old, then the new)",
        ),
    ]
