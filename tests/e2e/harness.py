"""End-to-end harness (imported by the e2e tests as `harness`): the real `keyturn` command
in subprocesses, a real sandbox over HTTP, SQLite files or a fresh PostgreSQL database,
workers killed with SIGKILL."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from keyturn.adapters.secrets_file import WebhookSecretsFileTarget
from keyturn.receiver import ReceiverProcess, start_receiver
from keyturn.sandbox.testing import SandboxProcess, start_sandbox

KEYTURN = [sys.executable, "-m", "keyturn"]
SA = "sandbox-service-account"
PAT = "sandbox-pat"
WEBHOOK = "sandbox-webhook"
#: The deploy targets `keyturn init` configures for the service account and the PAT.
TARGETS = ("local-files",)
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
    #: The reference receiver `sandbox-webhook` points at (``make_kt(receiver=True)``), else None.
    receiver: ReceiverProcess | None = None

    @property
    def config(self) -> Path:
        return self.workdir / "keyturn.toml"

    @property
    def secrets_file(self) -> Path:
        """The receiver's secrets file, the deploy target of sandbox-webhook."""
        return self.workdir / "deploy" / WEBHOOK / "secrets.json"

    def patch_config(self, old: str, new: str) -> None:
        """Replace one exact line of keyturn.toml (AssertionError if it is not there once)."""
        text = self.config.read_text()
        assert text.count(old) == 1, f"{old!r} is not in {self.config} exactly once"
        self.config.write_text(text.replace(old, new))

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

    # --- the same, in this process (about a second cheaper a call: for long kill chains)
    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.workdir / 'keyturn.db'}"

    def rotate_here(self, name: str = SA, reason: str = "e2e") -> str:
        """Record a rotation as `keyturn rotate NAME` does, without starting a process."""
        from keyturn.adapters.store.migrate import open_store
        from keyturn.cli.wiring import SystemClock, actor
        from keyturn.config import load_config
        from keyturn.engine.operator import start_rotation
        from keyturn.engine.registry import discovered

        registry = discovered()
        cfg = load_config(self.config, registry).credentials[name]
        store = open_store(self.database_url)
        try:
            rotation = start_rotation(
                store,
                registry,
                SystemClock(),
                credential=name,
                reason=reason,
                actor=actor(),
                options=registry.kind(cfg.kind).options(cfg),
            )
        finally:
            store.close()
        return rotation.id

    def show_here(self, rid: str) -> dict[str, Any]:
        """What `keyturn rotations show ID --json` prints, read in this process."""
        from keyturn.adapters.store.migrate import open_store
        from keyturn.cli import render
        from keyturn.config import load_config

        store = open_store(self.database_url)
        try:
            lease_seconds = load_config(self.config).worker.lease_seconds
            return render.show_document(store, store.get_rotation(rid), lease_seconds)
        finally:
            store.close()

    def credentials(self) -> list[dict[str, Any]]:
        """`keyturn credentials list --json`."""
        return list(json.loads(self.run("credentials", "list", "--json").stdout))

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

    def pat_credentials(self) -> dict[str, dict[str, Any]]:
        """The credentials of the PAT's linked user, as the PAT's token lists them."""
        token = self.bootstrap["pat"]["token"]
        r = httpx.get(
            f"{self.sandbox.base_url}/auth/credentials",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        r.raise_for_status()
        return {c["credentialUuid"]: c for c in r.json()["items"]}

    def provider_webhooks(self) -> dict[str, dict[str, Any]]:
        """Every webhook of the sandbox's organisation, by id."""
        token = self.bootstrap["service_account"]["token"]
        r = httpx.get(
            f"{self.sandbox.base_url}/webhooks",
            params={"limit": 100},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        r.raise_for_status()
        return {w["id"]: w for w in r.json()["items"]}

    def enable_webhooks(self) -> None:
        """Enable every webhook at the sandbox, as `init --enable-webhook` does once a receiver
        holds the secret (tests that run no receiver: its deliveries then fail, as before)."""
        with self.sandbox.client("service_account") as client:
            for webhook_id, hook in self.provider_webhooks().items():
                if hook["status"] != "Enabled":
                    r = client.request(
                        "PUT", f"/webhooks/{webhook_id}", {"status": "Enabled"}, sign=True
                    )
                    assert r.status_code == 200, r.text

    def deployed_secrets(self) -> list[str]:
        """The secrets the receiver's secrets file lists now."""
        return list(json.loads(self.secrets_file.read_text())["secrets"])

    def deployed(self, name: str = SA) -> tuple[bytes, dict[str, Any]]:
        d = self.workdir / "deploy" / name
        return (d / "private_key.pem").read_bytes(), json.loads((d / "credential.json").read_text())

    def sqlite_dump(self) -> str:
        with sqlite3.connect(self.workdir / "keyturn.db") as conn:
            return "\n".join(conn.iterdump())


class KtFactory:
    """``make(db_url=None, *, receiver=False, **sandbox_kwargs)``: a sandbox and an
    initialised keyturn working directory (short lease, fast retries), under `base`.

    With ``receiver=True`` the reference receiver runs too and sandbox-webhook points at it
    (``kt.receiver``; its record file is ``kt.receiver.record``). The receiver is started
    first, on a port it picks itself, reading a placeholder secrets file at the webhook's
    deploy path; `init` then points the webhook at it and deploys the real secret, which the
    receiver has loaded before this returns. No port is guessed, so parallel tests never race.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.sandboxes: list[SandboxProcess] = []
        self.receivers: list[ReceiverProcess] = []

    def make(
        self, db_url: str | None = None, *, receiver: bool = False, **sandbox_kwargs: Any
    ) -> Kt:
        base = self.base
        sandbox = start_sandbox(base / f"sandbox-{len(self.sandboxes)}", **sandbox_kwargs)
        self.sandboxes.append(sandbox)
        kt = Kt(base / f"work-{len(self.sandboxes)}", sandbox, db_url)
        init = ["init", str(kt.workdir), "--sandbox-bootstrap", str(sandbox.bootstrap_path)]
        if receiver:
            target = WebhookSecretsFileTarget("placeholder", kt.secrets_file)
            target.deploy([f"whs-placeholder-{secrets.token_hex(8)}"])
            kt.receiver = start_receiver(
                kt.secrets_file, record=base / f"receiver-{len(self.sandboxes)}.jsonl"
            )
            self.receivers.append(kt.receiver)
            init += ["--receiver-url", kt.receiver.url]
        kt.run(*init)
        if kt.receiver is not None:
            deployed = WebhookSecretsFileTarget("deployed", kt.secrets_file)
            kt.receiver.wait_for_version(deployed.read_back()[0])
        else:
            kt.enable_webhooks()  # init leaves it disabled when no receiver answers
        # A short lease, so a worker killed here is taken over within seconds, and fast retries.
        for old, new in LEASE_PATCH:
            kt.patch_config(old, new)
        return kt

    def close(self) -> None:
        for s in self.sandboxes:
            s.stop()
        for r in self.receivers:
            r.close()


# --- SIGKILL at action boundaries (see test_crash_matrix.py for the pattern)

#: Every boundary of an action: before its intent is recorded, after the intent commit, after
#: the provider call (before the outcome commit), after the outcome commit.
ACTION_BOUNDARIES = ("before_intent", "after_intent", "after_call", "after_outcome")


def kill_points_of(kind: Any, *, rollback: bool) -> list[str]:
    """Every action boundary and transition commit of a rotation kind (the actions its `steps`
    declare), forward or in rollback, so a new action gets its own kill points."""
    from keyturn.domain.lifecycle import Trigger

    points = []
    for trigger, step in kind.steps.items():
        if (trigger is Trigger.FINISH_ROLLBACK) != rollback:
            continue
        for action in step.expanded_actions(TARGETS):
            points += [
                f"{action.phase.value}.{action.name}.{moment}" for moment in ACTION_BOUNDARIES
            ]
        points.append(f"transition.{trigger.value}.after_commit")
    return points


def kill_worker_at(kt: Kt, point: str, marker: Path) -> None:
    """Run a worker that SIGKILLs itself at `point`; assert it died there."""
    killed = kt.worker(KEYTURN_TEST_CRASH_AT=point, KEYTURN_TEST_CRASH_MARKER=str(marker))
    assert killed.returncode == -9, f"worker was not killed at {point}: {killed.stderr[-2000:]}"
    assert marker.read_text().split() == [point]  # where the kill landed


def transitions_once(rotation: dict[str, Any]) -> bool:
    """No transition of the rotation was recorded twice."""
    seen = [(e["from"], e["to"]) for e in rotation["events"] if e["kind"] == "transition"]
    return len(seen) == len(set(seen))


def requests_since(kt: Kt, seq: int) -> tuple[int, list[dict[str, Any]]]:
    """The sandbox's request log after `seq`: (the newest seq, the requests in order)."""
    got = httpx.get(f"{kt.sandbox.base_url}/_sandbox/requests", params={"since": seq}).json()
    return int(got["seq"]), list(got["requests"])


def collapse(routes: list[str], polled: set[str]) -> list[str]:
    """Consecutive repeats of a polled route count as one (a poll's length is not planned)."""
    out: list[str] = []
    for r in routes:
        if not (out and out[-1] == r and r in polled):
            out.append(r)
    return out
