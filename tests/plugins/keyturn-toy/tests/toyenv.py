"""(imported by the toy tests as `toyenv`) A keyturn installation managing one toy
credential: config, master key, migrated SQLite database, a ledger holding the first key, the
credential imported. The tests drive the real `keyturn` command in subprocesses."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyturn_toy import fingerprint

KEYTURN = [sys.executable, "-m", "keyturn"]

CONFIG = """\
[database]
url = "sqlite:///keyturn.db"

[keys]
master_key_file = "master.key"

[worker]
lease_seconds = 2
poll_seconds = 0.1
max_attempts = 5
backoff_base_seconds = 0.1
backoff_max_seconds = 1

[providers.none]
base_url = "http://127.0.0.1:9"

[credentials.toy1]
kind = "toy"
provider = "none"
ledger = "ledger.json"
bake_seconds = {bake}

[[credentials.toy1.targets]]
type = "toy_file"
path = "deploy/toy1.secret"
"""


@dataclass
class Toy:
    workdir: Path

    @property
    def ledger(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.workdir / "ledger.json").read_text())
        return data

    @property
    def deployed(self) -> bytes:
        return (self.workdir / "deploy" / "toy1.secret").read_bytes()

    def run(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        full = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")}
        full["KEYTURN_CONFIG"] = str(self.workdir / "keyturn.toml")
        full.update(env)
        proc = subprocess.run(
            [*KEYTURN, *args], env=full, capture_output=True, text=True, timeout=120, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"keyturn {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
            )
        return proc

    def rotate(self) -> str:
        return self.run("rotate", "toy1").stdout.strip()

    # In-process shortcuts for set-up steps (a subprocess costs a second of start-up); what a
    # test proves (kills, refusals, reconcile) still goes through real processes.

    def wiring(self) -> Any:
        from keyturn.cli.wiring import Wiring
        from keyturn.config import load_config

        return Wiring(load_config(self.workdir / "keyturn.toml"))

    def rotate_here(self) -> str:
        rid: str = self.wiring().start_rotation("toy1", reason="test", actor="test").id
        return rid

    def worker_here(self) -> None:
        import asyncio

        from keyturn.engine.worker import Worker

        asyncio.run(Worker(self.wiring().engine_deps(1), concurrency=1).run(until_idle=True))

    def rollback_here(self, rid: str) -> None:
        import asyncio

        from keyturn.domain.model import OperatorAction
        from keyturn.engine.operator import request_action

        deps = self.wiring().engine_deps(1)
        _, applied = asyncio.run(request_action(deps, rid, OperatorAction.ROLLBACK, "t", "undo"))
        assert applied is not None and applied.outcome == "applied", applied

    def show(self, rid: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.run("rotations", "show", rid, "--json").stdout)
        return data


def make_toy(workdir: Path, *, bake: float = 0, first: bytes | None = None) -> Toy:
    from keyturn.adapters.store.migrate import upgrade
    from keyturn.adapters.vault import new_master_key
    from keyturn.cli.setup import ImportEntry, import_credential
    from keyturn.cli.wiring import Wiring
    from keyturn.config import load_config

    workdir.mkdir(parents=True, exist_ok=True)
    key = workdir / "master.key"
    key.write_text(new_master_key() + "\n")
    key.chmod(0o600)
    (workdir / "keyturn.toml").write_text(CONFIG.format(bake=bake))
    first = first if first is not None else secrets.token_bytes(32)
    (workdir / "first.secret").write_bytes(first)
    (workdir / "ledger.json").write_text(
        json.dumps({"k0": {"fingerprint": fingerprint(first), "active": True}})
    )
    config = load_config(workdir / "keyturn.toml")
    upgrade(config.database.url)
    import_credential(
        Wiring(config),
        ImportEntry(
            name="toy1",
            kind="toy",
            provider="none",
            material_file=workdir / "first.secret",
            material_option="--secret-file",
            credential_id="k0",
            credential_uuid=None,
            token_file=None,
        ),
    )
    return Toy(workdir)
