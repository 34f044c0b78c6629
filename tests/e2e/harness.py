"""End-to-end harness (imported by the e2e tests as `harness`): the real `keyturn` command
in subprocesses, a real sandbox over HTTP, SQLite files or a fresh PostgreSQL database,
workers killed with SIGKILL."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from keyturn.sandbox.testing import SandboxProcess

KEYTURN = [sys.executable, "-m", "keyturn"]
SA = "sandbox-service-account"
LEASE_PATCH = [
    ("lease_seconds = 30", "lease_seconds = 2"),
    ("backoff_base_seconds = 0.5", "backoff_base_seconds = 0.1"),
    ("poll_seconds = 1.0", "poll_seconds = 0.2"),
]


@dataclass
class Kt:
    """One keyturn installation: a working directory wired to a sandbox."""

    workdir: Path
    sandbox: SandboxProcess
    db_url: str | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.workdir / "keyturn.toml"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")}
        env["KEYTURN_CONFIG"] = str(self.config)
        if self.db_url:
            env["KEYTURN_DATABASE_URL"] = self.db_url
        env.update(extra)
        return env

    def run(
        self,
        *args: str,
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        log = self.workdir.parent / f"log-{len(self.logs)}.txt"
        proc = subprocess.run(
            [*KEYTURN, *args],
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        log.write_text(proc.stdout + proc.stderr)
        self.logs.append(log)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"keyturn {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def rotate(self, name: str = SA) -> str:
        return str(json.loads(self.run("rotate", name, "--json").stdout)["id"])

    def show(self, rid: str) -> dict[str, Any]:
        return dict(json.loads(self.run("rotations", "show", rid, "--json").stdout))

    def worker(self, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
        return self.run("worker", "--until-idle", *extra, check=False, env=self.env(**env))

    # --- the provider's view, over HTTP
    @property
    def bootstrap(self) -> dict[str, Any]:
        return dict(self.sandbox.bootstrap)

    def provider_credentials(self) -> dict[str, dict[str, Any]]:
        token = self.bootstrap["service_account"]["token"]
        r = httpx.get(
            f"{self.sandbox.base_url}/auth/credentials",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        r.raise_for_status()
        return {c["credentialUuid"]: c for c in r.json()["items"]}

    def deployed(self) -> tuple[bytes, dict[str, Any]]:
        d = self.workdir / "deploy" / SA
        return (d / "private_key.pem").read_bytes(), json.loads((d / "credential.json").read_text())

    def sqlite_dump(self) -> str:
        with sqlite3.connect(self.workdir / "keyturn.db") as conn:
            return "\n".join(conn.iterdump())
