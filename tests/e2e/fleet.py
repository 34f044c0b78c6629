"""A fleet for the fault, concurrency and restart tests (imported by them as `fleet`).

- :func:`make_fleet`: a sandbox with N service accounts and one keyturn working directory that
  manages all N (the first through `keyturn init`, the rest imported in-process, which is far
  faster than N CLI calls), with the [worker] and provider settings a test asks for.
- :meth:`Fleet.start_rotations`: one pending rotation per managed credential, in-process.
- :meth:`Fleet.start_worker`: a real `python -m keyturn worker` process, JSON logs captured to a
  file, to be frozen (SIGSTOP), continued, stopped (SIGTERM) or killed.
- :class:`DbReader`: plain read-only SQL on the store's tables (SQLite or PostgreSQL), so polling
  from the test never takes SQLite's write lock (the store begins every transaction IMMEDIATE).
- :meth:`Fleet.check_provider`: every account at the sandbox holds exactly its old credential
  (inactive) and the one its rotation created (active), and the files deployed match.
- :class:`PgCluster`: a throwaway PostgreSQL cluster (initdb, own port and socket dir) that a
  test may stop and start; never the shared server.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from harness import KEYTURN, SA, Kt

from keyturn.cli.setup import ImportEntry, import_credential
from keyturn.cli.wiring import Wiring
from keyturn.config import load_config
from keyturn.domain.model import CredentialKind
from keyturn.sandbox.testing import SandboxProcess, start_sandbox

FINAL = {"old_deactivated", "rolled_back", "cancelled"}
FORWARD_TRANSITIONS = [
    ("pending", "new_added"),
    ("new_added", "verified"),
    ("verified", "old_deactivated"),
]
PG_BIN = Path("/usr/lib/postgresql/15/bin")


# ------------------------------------------------------------------------------ the database


def libpq_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _aware(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


@dataclass(frozen=True)
class RotationRow:
    id: str
    credential: str
    state: str
    version: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    attempts: int
    last_error: str | None
    halted_reason: str | None
    data: dict[str, Any]

    @property
    def settled(self) -> bool:
        """Final, or halted for a human: no worker will move it on its own."""
        return self.state in FINAL or self.halted_reason is not None


@dataclass(frozen=True)
class EventRow:
    id: int
    rotation_id: str
    at: datetime
    kind: str
    actor: str
    from_state: str | None
    to_state: str | None
    trigger: str | None
    detail: dict[str, Any]


_ROTATION_COLUMNS = (
    "id, credential, state, version, lease_owner, lease_expires_at, attempts, last_error, "
    "halted_reason, data"
)
_EVENT_COLUMNS = "id, rotation_id, at, kind, actor, from_state, to_state, trigger, detail"


class DbReader:
    """Read-only SQL on keyturn's tables; a new connection per call (survives restarts)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite_path: Path | None = None
        if url.startswith("sqlite:///"):
            self.sqlite_path = Path(url.removeprefix("sqlite:///"))
        elif not url.startswith("postgresql"):
            raise ValueError(f"unsupported database URL for the reader: {url}")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.sqlite_path is not None:
            conn = sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True, timeout=30)
            try:
                return list(conn.execute(sql, params).fetchall())
            finally:
                conn.close()
        with psycopg.connect(libpq_url(self.url), connect_timeout=5, autocommit=True) as pg:
            return list(pg.execute(sql.replace("?", "%s"), params).fetchall())

    def rotations(self) -> dict[str, RotationRow]:
        rows = self.query(f"SELECT {_ROTATION_COLUMNS} FROM rotations")  # noqa: S608 (constants)
        out = {}
        for r in rows:
            out[r[0]] = RotationRow(
                id=r[0],
                credential=r[1],
                state=r[2],
                version=int(r[3]),
                lease_owner=r[4],
                lease_expires_at=_aware(r[5]),
                attempts=int(r[6]),
                last_error=r[7],
                halted_reason=r[8],
                data=dict(_json(r[9])),
            )
        return out

    def rotation(self, rotation_id: str) -> RotationRow:
        return self.rotations()[rotation_id]

    def events(self, rotation_id: str | None = None) -> list[EventRow]:
        where, params = ("WHERE rotation_id = ?", (rotation_id,)) if rotation_id else ("", ())
        sql = f"SELECT {_EVENT_COLUMNS} FROM events {where} ORDER BY id"  # noqa: S608 (constants)
        rows = self.query(sql, params)
        return [
            EventRow(
                id=int(r[0]),
                rotation_id=r[1],
                at=_aware(r[2]) or datetime.now(UTC),
                kind=r[3],
                actor=r[4],
                from_state=r[5],
                to_state=r[6],
                trigger=r[7],
                detail=dict(_json(r[8]) or {}),
            )
            for r in rows
        ]

    def actions(self) -> list[tuple[str, str, str, str, dict[str, Any]]]:
        """(rotation id, phase, name, status, detail) of every action record."""
        rows = self.query("SELECT rotation_id, phase, name, status, detail FROM actions")
        return [(r[0], r[1], r[2], r[3], dict(_json(r[4]) or {})) for r in rows]

    def action_status(self, rotation_id: str, name: str) -> str | None:
        rows = self.query(
            "SELECT status FROM actions WHERE rotation_id = ? AND name = ?", (rotation_id, name)
        )
        return str(rows[0][0]) if rows else None


def transitions_by_rotation(events: Iterable[EventRow]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for e in events:
        if e.kind == "transition":
            out.setdefault(e.rotation_id, []).append((e.from_state or "", e.to_state or ""))
    return out


# ------------------------------------------------------------------------------ workers


@dataclass
class WorkerProc:
    """A `keyturn worker` subprocess with its stderr (JSON log lines) in a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (anything else, e.g. a traceback, is skipped)."""
        out = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def owner(self, timeout: float = 30.0) -> str:
        """The worker's owner id, from its "worker started" line (waits for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if line.get("event") == "worker started":
                    return str(line["owner"])
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"worker {self.name} logged no start line: {self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.stderr()[-chars:]

    def transitions_logged(self) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == "transition"]

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit code (AssertionError if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"worker {self.name} did not exit within {timeout:.0f}s of SIGTERM: {self.tail()}"
            ) from None

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.name} still running after {timeout:.0f}s: {self.tail()}"
            ) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)  # a frozen process must be able to die
            self.proc.kill()
        self.proc.wait()


# ------------------------------------------------------------------------------ the fleet


@dataclass
class Fleet:
    """N managed service accounts in one keyturn working directory, on one sandbox."""

    kt: Kt
    db_url: str
    names: list[str]
    #: managed credential name -> its bootstrap account (token, credential ids, key)
    accounts: dict[str, dict[str, Any]]
    rotation_ids: dict[str, str] = field(default_factory=dict)  # name -> rotation id
    workers: list[WorkerProc] = field(default_factory=list)

    @property
    def sandbox(self) -> SandboxProcess:
        return self.kt.sandbox

    @property
    def reader(self) -> DbReader:
        return DbReader(self.db_url)

    def wiring(self) -> Wiring:
        config = load_config(self.kt.config)
        database = config.database.model_copy(update={"url": self.db_url})
        return Wiring(config.model_copy(update={"database": database}))

    def start_rotations(self, reason: str = "fleet test") -> list[str]:
        """One pending rotation per managed credential (in-process); their ids."""
        w = self.wiring()
        try:
            for name in self.names:
                # as `keyturn rotate NAME` does: the options its kind derives from the config
                rotation = w.start_rotation(name, reason=reason, actor="fleet-test")
                self.rotation_ids[name] = rotation.id
        finally:
            w.store.close()
        return list(self.rotation_ids.values())

    def start_worker(self, *extra: str, concurrency: int = 8, **env: str) -> WorkerProc:
        """A `keyturn worker` process (as a service unless `--until-idle` is passed)."""
        name = f"w{len(self.workers)}"
        log_path = self.kt.workdir.parent / f"worker-{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    *KEYTURN,
                    "--log-format",
                    "json",
                    "worker",
                    "--concurrency",
                    str(concurrency),
                    *extra,
                ],
                env=self.kt.env(PYTHONUNBUFFERED="1", **env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        worker = WorkerProc(name, proc, log_path)
        self.workers.append(worker)
        return worker

    def wait_settled(
        self,
        timeout: float,
        *,
        every: float = 0.25,
        on_poll: Callable[[dict[str, RotationRow]], None] | None = None,
        tolerate_db_errors: bool = False,
    ) -> dict[str, RotationRow]:
        """Poll until every rotation is final or halted; the last view of them.

        AssertionError (with the stuck rotations and the workers' log tails) on timeout or when
        a worker process dies.
        """
        deadline = time.monotonic() + timeout
        rows: dict[str, RotationRow] = {}
        while True:
            try:
                rows = self.reader.rotations()
            except (sqlite3.Error, psycopg.Error):
                if not tolerate_db_errors:
                    raise
                rows = {}
            if on_poll is not None:
                on_poll(rows)
            if rows and all(r.settled for r in rows.values()):
                return rows
            for w in self.workers:
                code = w.proc.poll()
                if code is not None and code != 0:
                    raise AssertionError(f"worker {w.name} exited {code}: {w.tail()}")
            if time.monotonic() > deadline:
                stuck = [r for r in rows.values() if not r.settled][:5]
                tails = "\n".join(f"--- {w.name}:\n{w.tail(1500)}" for w in self.workers)
                raise AssertionError(
                    f"not every rotation settled within {timeout:.0f}s; "
                    f"{len([r for r in rows.values() if not r.settled])} left, e.g. {stuck}\n"
                    f"{tails}"
                )
            time.sleep(every)

    def stop_workers(self) -> dict[str, int]:
        return {w.name: w.stop() for w in self.workers if w.proc.returncode is None} | {
            w.name: w.proc.returncode for w in self.workers if w.proc.returncode is not None
        }

    def kill_workers(self) -> None:
        for w in self.workers:
            w.kill()

    # --- checks

    def assert_all_done(self, rows: dict[str, RotationRow]) -> None:
        """Every rotation of this fleet reached old_deactivated (halted ones listed if not)."""
        assert set(rows) == set(self.rotation_ids.values()), "unexpected rotations in the store"
        bad = {
            r.id: (r.state, r.halted_reason or r.last_error)
            for r in rows.values()
            if r.state != "old_deactivated"
        }
        assert not bad, f"{len(bad)} of {len(rows)} rotations did not finish: {bad}"

    def assert_transitions_once(self) -> dict[str, list[EventRow]]:
        """Each rotation's transition events are exactly the forward path, each once."""
        events = self.reader.events()
        by_rotation = transitions_by_rotation(events)
        wrong = {
            rid: by_rotation.get(rid)
            for rid in self.rotation_ids.values()
            if by_rotation.get(rid) != FORWARD_TRANSITIONS
        }
        assert not wrong, f"{len(wrong)} rotation(s) with a wrong transition log: {wrong}"
        out: dict[str, list[EventRow]] = {}
        for e in events:
            out.setdefault(e.rotation_id, []).append(e)
        return out

    def check_provider(self, rows: dict[str, RotationRow]) -> None:
        """At the sandbox, each account holds exactly two credentials: the old one inactive and
        the one its rotation recorded, active, named after the rotation; the deployed files hold
        the new credential. (Call with faults cleared.)"""
        problems = []
        with httpx.Client(base_url=self.sandbox.base_url, timeout=10) as http:
            for name in self.names:
                acct = self.accounts[name]
                rid = self.rotation_ids[name]
                new_uuid = rows[rid].data.get("new_credential_uuid")
                r = http.get(
                    "/auth/credentials", headers={"Authorization": f"Bearer {acct['token']}"}
                )
                r.raise_for_status()
                creds = {c["credentialUuid"]: c for c in r.json()["items"]}
                summary = {u: (c["name"], c["isActive"]) for u, c in creds.items()}
                if len(creds) != 2:
                    problems.append(f"{name}: {len(creds)} credentials {summary}")
                    continue
                old = creds.get(acct["credential_uuid"])
                new = creds.get(str(new_uuid))
                if old is None or old["isActive"] is not False:
                    problems.append(f"{name}: old credential not inactive {summary}")
                if new is None or new["isActive"] is not True or new["name"] != f"keyturn-{rid}":
                    problems.append(f"{name}: new credential {new_uuid} not active {summary}")
                meta = json.loads(
                    (self.kt.workdir / "deploy" / name / "credential.json").read_text()
                )
                if meta.get("credentialUuid") != new_uuid:
                    problems.append(f"{name}: deployed {meta.get('credentialUuid')} != {new_uuid}")
        assert not problems, f"{len(problems)} account(s) wrong at the sandbox: {problems[:10]}"

    def reconcile(self) -> subprocess.CompletedProcess[str]:
        return self.kt.run("reconcile", "--json", check=False)


def add_credential_section(config: Path, name: str) -> None:
    with config.open("a") as f:
        f.write(
            f'\n[credentials.{name}]\nkind = "service_account"\nprovider = "sandbox"\n'
            f'[[credentials.{name}.targets]]\ntype = "file"\npath = "deploy/{name}"\n'
        )


def make_fleet(
    base: Path,
    n: int,
    *,
    db_url: str | None = None,
    worker: dict[str, Any] | None = None,
    timeout_seconds: float | None = None,
    sandbox_args: list[str] | None = None,
) -> Fleet:
    """A sandbox with `n` service accounts and a keyturn working directory managing them all.

    `worker` replaces keys of the [worker] section (e.g. {"lease_seconds": 3}); keys not given
    keep what `keyturn init` wrote (its retry policy included). `db_url` (PostgreSQL) is passed
    as KEYTURN_DATABASE_URL to every keyturn process; without it the store is SQLite.
    """
    sandbox = start_sandbox(
        base / "sandbox", service_accounts=n, extra_args=list(sandbox_args or [])
    )
    try:
        kt = Kt(base / "work", sandbox, db_url)
        kt.run("init", str(kt.workdir), "--sandbox-bootstrap", str(sandbox.bootstrap_path))
        kt.enable_webhooks()  # no receiver runs here
        text = kt.config.read_text()
        for setting, value in (worker or {}).items():
            text = _replace_setting(text, setting, value)
        if timeout_seconds is not None:
            text = _replace_setting(text, "timeout_seconds", timeout_seconds)
        kt.config.write_text(text)

        accounts_list = sandbox.bootstrap["service_accounts"]
        assert len(accounts_list) == n
        names = [SA] + [f"svc-{i}" for i in range(1, n)]
        for name in names[1:]:
            add_credential_section(kt.config, name)
        accounts = dict(zip(names, accounts_list, strict=True))
        fleet = Fleet(kt, db_url or load_config(kt.config).database.url, names, accounts)
        secrets_dir = base / "import"
        secrets_dir.mkdir(mode=0o700)
        w = fleet.wiring()
        try:
            for name in names[1:]:
                acct = accounts[name]
                key = secrets_dir / f"{name}.pem"
                key.write_text(acct["private_key_pem"])
                token = secrets_dir / f"{name}.token"
                token.write_text(acct["token"])
                import_credential(
                    w,
                    ImportEntry(
                        name=name,
                        kind=CredentialKind.SERVICE_ACCOUNT,
                        provider="sandbox",
                        material_file=key,
                        material_option="--private-key-file",
                        credential_id=acct["credential_id"],
                        credential_uuid=acct["credential_uuid"],
                        token_file=token,
                    ),
                    verify=False,
                )
        finally:
            w.store.close()
        shutil.rmtree(secrets_dir)
        return fleet
    except BaseException:
        sandbox.stop()
        raise


def _replace_setting(text: str, key: str, value: Any) -> str:
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if line.split("=")[0].strip() == key]
    assert len(hits) == 1, f"{key} appears {len(hits)} times in the config written by init"
    lines[hits[0]] = f"{key} = {value}"
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ PostgreSQL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """A throwaway PostgreSQL 15 cluster on its own port and socket directory.

    As root the server cannot run, so the binaries run as the `postgres` user in a private
    directory it owns (under /tmp, since pytest's base temp directory is closed to others);
    otherwise everything lives in `base`. Superuser `root`, trust auth, TCP on 127.0.0.1.
    """

    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self._user: str | None = None
        self._own_dir: Path | None = None
        if os.geteuid() == 0:
            self._user = "postgres"
            entry = pwd.getpwnam(self._user)
            self._own_dir = Path(tempfile.mkdtemp(prefix="keyturn-pg-"))
            os.chown(self._own_dir, entry.pw_uid, entry.pw_gid)
            root = self._own_dir
        else:
            root = base / "pg"
            root.mkdir()
        self.data = root / "data"
        self.socket_dir = root / "sock"
        self.log = root / "server.log"
        self.started = False

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://root@127.0.0.1:{self.port}/keyturn"

    def _run(self, *args: str, timeout: float = 60) -> None:
        proc = subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, user=self._user
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}: {proc.stderr[-1500:]}"
                f"\nserver log: {self.log_tail()}"
            )

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def init(self) -> PgCluster:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "root", "--auth=trust",
                  "--no-sync", "-E", "UTF8")  # fmt: skip
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            self.socket_dir.mkdir()
            os.chown(self.socket_dir, entry.pw_uid, entry.pw_gid)
        else:
            self.socket_dir.mkdir()
        self.start()
        admin = f"postgresql://root@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute('CREATE DATABASE "keyturn"')
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "30", "-o", options, "start")  # fmt: skip
        self.started = True

    def stop(self, mode: str = "fast") -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w", "-t", "30", "-m", mode,
                  "stop")  # fmt: skip
        self.started = False

    def destroy(self) -> None:
        if self.started:
            with contextlib.suppress(AssertionError):
                self.stop("immediate")
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
