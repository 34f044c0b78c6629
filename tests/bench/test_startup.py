"""Start-up time of the command line (issue 12): `keyturn --help`, `keyturn --version` and
`keyturn rotations list` on SQLite with 1,000 rotations, each the median wall time of 10 runs
of the installed console script, with the 5 costliest imports of each (``python -X importtime``,
self time summed per top-level package).

Reported, never asserted (goals: 0.2 s for --help/--version, 0.35 s for rotations list).
`rotations list --json` is reported too: the same data path without the terminal table.

With BENCH_STARTUP_BASELINE set to another source tree (its src/ and migrations/), the same
commands run from it as well, alternating run by run with this tree (so both see the same load
on a shared machine), e.g. the commit before a start-up change::

    .venv/bin/pytest -q -s tests/bench/test_startup.py
    git archive 15eca55 src migrations | (mkdir -p /tmp/base && tar -x -C /tmp/base)
    BENCH_STARTUP_BASELINE=/tmp/base .venv/bin/pytest -q -s tests/bench/test_startup.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import benchlib

from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.vault import MasterKey

ROTATIONS = 1000
CREDENTIALS = 100
KEYTURN = Path(sys.executable).with_name("keyturn")

CONFIG = """\
[database]
url = "sqlite:///keyturn.db"

[keys]
master_key_file = "master.key"

[providers.bench]
base_url = "http://127.0.0.1:9"
"""


COMMANDS = {
    "keyturn --help": ["--help"],
    "keyturn --version": ["--version"],
    "keyturn rotations list": ["rotations", "list"],
    "keyturn rotations list --json": ["rotations", "list", "--json"],
}


def _env(workdir: Path, tree: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")}
    env["KEYTURN_CONFIG"] = str(workdir / "keyturn.toml")
    if tree is not None:  # its keyturn package wins over the installed (editable) one
        env["PYTHONPATH"] = str(tree / "src")
    return env


def _wall(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run([str(KEYTURN), *args], env=env, cwd=cwd, capture_output=True, check=False)
    return time.perf_counter() - start, proc.returncode


def _figures(times: list[float], rc: int) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "exit": rc,
    }


def _top_imports(args: list[str], env: dict[str, str], cwd: Path, n: int = 5) -> list[str]:
    """The `n` top-level packages whose modules' own import time (summed) is largest."""
    code = "import sys; sys.argv[0] = 'keyturn'; from keyturn.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    per_package: dict[str, int] = defaultdict(int)
    total = 0
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, _cumulative, name = (p.strip() for p in line[len("import time:") :].split("|"))
        per_package[name.split(".")[0]] += int(self_us)
        total += int(self_us)
    ranked = sorted(per_package.items(), key=lambda kv: kv[1], reverse=True)[:n]
    return [f"{name} {us / 1e6:.3f} s" for name, us in ranked] + [f"(all {total / 1e6:.3f} s)"]


def _seed(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "keyturn.toml").write_text(CONFIG)
    master = MasterKey.generate()
    key = workdir / "master.key"
    key.write_text(master.text() + "\n")
    key.chmod(0o600)
    url = f"sqlite:///{workdir / 'keyturn.db'}"
    upgrade(url)
    _seed_finished_rotations(url)


def _seed_finished_rotations(url: str) -> None:
    """CREDENTIALS managed service accounts with ROTATIONS finished rotations between them,
    inserted in bulk (what as many `keyturn rotate` and workers would have left)."""
    from sqlalchemy import insert

    from keyturn.adapters.store.sql import SqlStore, credentials_t, events_t, rotations_t

    now = datetime.now(UTC)
    creds, rotations, events = [], [], []
    for c in range(CREDENTIALS):
        name = f"svc-{c:04d}"
        creds.append(
            {
                "name": name,
                "kind": "service_account",
                "provider": "bench",
                "credential_id": f"cid-{c}",
                "credential_uuid": f"cr-{c}",
                "key_ref": None,
                "algorithm": "ed25519",
                "token_ref": None,
                "created_at": now,
                "updated_at": now,
            }
        )
    for i in range(ROTATIONS):
        c = i % CREDENTIALS
        at = now - timedelta(minutes=ROTATIONS - i)
        rid = f"rot_bench_{i:06d}"
        rotations.append(
            {
                "id": rid,
                "credential": f"svc-{c:04d}",
                "kind": "service_account",
                "state": "old_deactivated",
                "version": 4,
                "reason": "bench",
                "created_at": at,
                "updated_at": at,
                "next_attempt_at": None,
                "lease_owner": None,
                "lease_expires_at": None,
                "attempts": 0,
                "last_error": None,
                "halted_reason": None,
                "paused": False,
                "request_action": None,
                "request_actor": None,
                "request_reason": None,
                "request_at": None,
                "rollback_from": None,
                "finished_at": at,
                "data": {"old_credential_id": f"cid-{c}", "algorithm": "ed25519"},
            }
        )
        events.append(
            {
                "rotation_id": rid,
                "at": at,
                "kind": "operator",
                "actor": "bench",
                "from_state": None,
                "to_state": "pending",
                "trigger": "create",
                "reason": "bench",
                "detail": {},
            }
        )
    store = SqlStore(url)
    try:
        with store.engine.begin() as conn:
            conn.execute(insert(credentials_t), creds)
            conn.execute(insert(rotations_t), rotations)
            conn.execute(insert(events_t), events)
    finally:
        store.close()


def test_startup(tmp_path: Path) -> None:
    runs = benchlib.env_int("BENCH_STARTUP_RUNS", 10)
    baseline = os.environ.get("BENCH_STARTUP_BASELINE")
    trees: dict[str, Path | None] = {"this tree": None}
    if baseline:
        trees["baseline"] = Path(baseline).resolve()
    workdir = tmp_path / "work"
    _seed(workdir)
    for tree in trees.values():
        listed = subprocess.run(
            [str(KEYTURN), "rotations", "list", "--json"],
            env=_env(workdir, tree),
            cwd=workdir,
            capture_output=True,
            text=True,
            check=True,
        )
        # a benchmark of a broken run is worthless
        assert len(json.loads(listed.stdout)) == ROTATIONS
    figures: dict[str, Any] = {
        "runs": runs,
        "rotations": ROTATIONS,
        "commit": benchlib.git_head(),
        "baseline": baseline,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    for label, args in COMMANDS.items():
        times: dict[str, list[float]] = {name: [] for name in trees}
        rcs: dict[str, int] = {}
        for _ in range(runs):
            for name, tree in trees.items():
                wall, rcs[name] = _wall(args, _env(workdir, tree), workdir)
                times[name].append(wall)
        figures[label] = {
            name: {
                **_figures(times[name], rcs[name]),
                "top_imports": _top_imports(args, _env(workdir, tree), workdir),
            }
            for name, tree in trees.items()
        }
    benchlib.RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = benchlib.RESULTS / f"startup-{stamp}.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\n=== startup ===\n{json.dumps(figures, indent=2)}\n-> {path}")
    print(_table(figures, list(trees)))


def _table(figures: dict[str, Any], trees: list[str]) -> str:
    head = "| command | " + " | ".join(f"{t} median (min-max) s" for t in trees) + " |"
    lines = [head, "|" + "---|" * (len(trees) + 1)]
    for label in COMMANDS:
        cells = []
        for t in trees:
            f = figures[label][t]
            rc = "" if f["exit"] == 0 else f", exit {f['exit']}"
            cells.append(f"{f['median_s']:.3f} ({f['min_s']:.3f}-{f['max_s']:.3f}{rc})")
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
