"""Throughput with a remote deploy target (issue 11): service-account rotations deploying to
``aws_secrets_manager`` on a moto server behind a delaying proxy (tests/bench/delay_proxy.py:
every AWS request held BENCH_AWS_DELAY_MS, default 200 ms), run by one `keyturn worker` at
BENCH_CONCURRENCY (default 64) on PostgreSQL. The sandbox (the provider) has no artificial
latency.

Each credential of the fleet (tests/e2e/fleet.py, BENCH_AWS_FLEET accounts, default 128) has
one target, aws_secrets_manager, its own secret, seeded straight at moto (not through the
proxy) with the current key, tagged as keyturn tags the secrets it creates. The file target
`make_fleet` gives every credential is removed: the figure is the one the issue names (the AWS
target), and a second target's own engine work (two more actions and their commits; here their
cost was within this bench's run-to-run noise) is what tests/bench/test_engine_overhead.py
measures. BENCH_AWS_KEEP_FILE_TARGET=1 keeps it (the
figures of earlier sessions were taken so).

On the same moto and proxy: BENCH_AWS_SINGLE_RUNS (default 3) runs of one credential alone,
each with its own worker, for the per-rotation critical path (its first action intent to its
final transition, from the action records and events; the median is used) and the AWS requests
a rotation makes. Each single run's worker first rotates another credential (a warm-up, not
measured), so the one measured pays no one-time cost of a fresh process (importing boto3,
making its client, the first connections: ~0.4 s of a cold rotation, which would lengthen the
critical path and so flatter the ratio); a fleet's rotations do not pay it either. Then the
fleet, for rotations/s from the worker's start to the last rotation's finish. The headline:
rotations/s / (concurrency / critical path), the goal being >= 0.8. With it: the CPU seconds
the worker, the sandbox, moto and the proxy spent (all on the same machine), the worker
threads' run-queue wait and the machine's load, since on a small shared machine CPU, not AWS's
latency, is what the fleet waits for. PostgreSQL's CPU is counted too (its processes alive at
the end), and every figure per rotation: the sum is what the machine's cores must give each
rotation, all processes together. For each rotation, the time inside its actions (an intent to
its outcome, the intent's commit included) and between them.

BENCH_PY_SPY=<dir> samples the fleet's worker with py-spy (`.venv/bin/pip install py-spy`;
threads holding the GIL only) into <dir>/aws-fleet.txt, collapsed stacks.

Reported, never asserted: every figure. Asserted: every rotation reached old_deactivated, and
every secret's AWSCURRENT holds the rotation's new credential and AWSPREVIOUS the old one.

    .venv/bin/pytest -q -s tests/bench/test_aws_target.py
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import benchlib
import pytest
from delay_proxy import DelayProxy, start_delay_proxy
from fleet import Fleet, make_fleet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from moto_fixture import AWS_TEST_ENV, MotoServer, start_moto

from keyturn.adapters.material import (
    CREDENTIAL_KEY,
    MANAGED_BY,
    MANAGED_BY_KEY,
    material_from_document,
    material_json,
)
from keyturn.ports import DeployedMaterial

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(3600)]

TARGET = "aws"
GOAL = 0.8


def epoch(value: Any) -> float:
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert isinstance(value, datetime), value
    return value.timestamp()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_cpu_seconds(pid: int) -> float:
    """The kernel's share of cpu_seconds (system calls: sockets, futexes, epoll, fsync)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return int(fields[12]) / os.sysconf("SC_CLK_TCK")


def postgres_cpu() -> dict[int, float]:
    """CPU time of each PostgreSQL server process alive now (backends, the WAL writer, the
    checkpointer...), from /proc: the database shares the machine's cores too."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(postgres)" in text:
            fields = text.rsplit(")", 1)[1].split()
            found[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf(
                "SC_CLK_TCK"
            )
    return found


def postgres_cpu_since(before: dict[int, float]) -> float:
    """PostgreSQL's CPU since `before` (postgres_cpu()): processes alive at both times, and
    those started since in full (one that exited in between is not counted)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in postgres_cpu().items())


def runqueue_wait_seconds(pid: int) -> float:
    """Time the threads of a process alive now spent runnable but waiting for a CPU (the
    machine's contention as this process felt it; /proc/PID/task/*/schedstat)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def moto_client(moto: MotoServer) -> Any:
    import boto3

    return boto3.session.Session(
        region_name="us-east-1",
        aws_access_key_id=AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
    ).client("secretsmanager", endpoint_url=moto.url)


def secret_id(run: str, name: str) -> str:
    return f"bench/{run}/{name}"


def add_aws_targets(fleet: Fleet, run: str, proxy: DelayProxy, moto: MotoServer) -> None:
    """One aws_secrets_manager target per credential, behind the proxy, its secret seeded at
    moto (bypassing the proxy) with the credential's current key."""
    if not benchlib.env_int("BENCH_AWS_KEEP_FILE_TARGET", 0):
        # the aws_secrets_manager target alone: the file target make_fleet gives each
        # credential goes (its section is the last lines of the credential's block)
        text = fleet.kt.config.read_text()
        for name in fleet.names:
            text, found = re.subn(
                rf'\[\[credentials\.{re.escape(name)}\.targets\]\]\ntype = "file"\n'
                r'(name = "[^"\n]*"\n)?path = "[^"\n]*"\n',
                "",
                text,
            )
            assert found == 1, f"no file target of {name} found in the fleet's config"
        fleet.kt.config.write_text(text)
    with fleet.kt.config.open("a") as out:
        for name in fleet.names:
            out.write(
                f'\n[[credentials.{name}.targets]]\ntype = "aws_secrets_manager"\n'
                f'name = "{TARGET}"\nsecret_id = "{secret_id(run, name)}"\n'
                f'endpoint_url = "{proxy.url}"\n'
            )
    aws = moto_client(moto)
    for name in fleet.names:
        acct = fleet.accounts[name]
        old = DeployedMaterial(
            acct["private_key_pem"].encode(), acct["credential_id"], acct["credential_uuid"]
        )
        # Created with a value: its first version, labelled AWSCURRENT.
        aws.create_secret(
            Name=secret_id(run, name),
            SecretString=material_json(old),
            Tags=[
                {"Key": MANAGED_BY_KEY, "Value": MANAGED_BY},
                {"Key": CREDENTIAL_KEY, "Value": name},
            ],
        )


def check_secrets(fleet: Fleet, run: str, rows: dict[str, Any], moto: MotoServer) -> None:
    """AWSCURRENT of every secret is the rotation's new key, AWSPREVIOUS the old one."""
    aws = moto_client(moto)
    wrong = []
    for name in fleet.names:
        rotation = rows[fleet.rotation_ids[name]]
        held = {}
        for stage in ("AWSCURRENT", "AWSPREVIOUS"):
            value = aws.get_secret_value(SecretId=secret_id(run, name), VersionStage=stage)
            held[stage] = material_from_document(value["SecretString"], stage).credential_uuid
        want = {
            "AWSCURRENT": rotation.data.get("new_credential_uuid"),
            "AWSPREVIOUS": fleet.accounts[name]["credential_uuid"],
        }
        if held != want:
            wrong.append((name, held, want))
    assert not wrong, f"{len(wrong)} secret(s) not rotated: {wrong[:5]}"


def start_rotations(fleet: Fleet, names: list[str]) -> None:
    """A pending rotation of each of `names` (as Fleet.start_rotations does for all)."""
    w = fleet.wiring()
    try:
        for name in names:
            rotation = w.start_rotation(name, reason="aws target bench", actor="bench")
            fleet.rotation_ids[name] = rotation.id
    finally:
        w.store.close()


def run_fleet(
    base: Path,
    n: int,
    concurrency: int,
    moto: MotoServer,
    proxy: DelayProxy,
    *,
    warm_up: bool = False,
) -> dict[str, Any]:
    """N credentials rotated by one worker; timings, AWS requests, per-rotation spans. With
    `warm_up`, the worker first rotates one more credential, and only then are the N started
    and measured (its wall and start-up figures are then not meaningful)."""
    run = base.name
    timeout = benchlib.env_float("BENCH_TIMEOUT_SECONDS", 1800)
    with benchlib.fresh_db(f"kt_bench_aws_{run}") as dbname:
        fleet = make_fleet(base, n + int(warm_up), db_url=benchlib.sa_url(dbname))
        try:
            add_aws_targets(fleet, run, proxy, moto)
            measured, warm = fleet.names[:n], fleet.names[n:]
            others = {
                "sandbox": fleet.sandbox.pid,
                "moto": moto.process.pid,
                "proxy": proxy.process.pid,
            }
            worker = None
            if warm:
                start_rotations(fleet, warm)
                worker = fleet.start_worker(concurrency=concurrency, **AWS_TEST_ENV)
                others["worker"] = worker.pid
                fleet.wait_settled(timeout=timeout, every=0.1)
            start_rotations(fleet, measured)
            before = proxy.stats()
            cpu_before = {k: cpu_seconds(pid) for k, pid in others.items()}
            pg_before = postgres_cpu()
            sys_before = system_cpu_seconds(others["worker"]) if "worker" in others else 0.0
            load_before = os.getloadavg()[0]
            t0 = time.time()
            if worker is None:
                worker = fleet.start_worker(concurrency=concurrency, **AWS_TEST_ENV)
                others["worker"] = worker.pid
            spy = benchlib.start_py_spy(worker.pid, f"aws-{run}")
            # Every poll is a new PostgreSQL connection (~6 ms of CPU, mostly the server's
            # fork) on the cores the fleet runs on; the figures come from the database's
            # timestamps, not from when a poll saw them, so polling slowly costs no accuracy.
            rows = fleet.wait_settled(timeout=timeout, every=0.5)
            benchlib.stop_py_spy(spy)
            after = proxy.stats()
            cpu = {k: cpu_seconds(pid) - cpu_before.get(k, 0.0) for k, pid in others.items()}
            cpu["postgres"] = postgres_cpu_since(pg_before)
            worker_system = system_cpu_seconds(worker.pid) - sys_before
            waited = runqueue_wait_seconds(worker.pid)
            load_after = os.getloadavg()[0]
            started = [
                epoch(line["timestamp"])
                for line in worker.lines()
                if line.get("event") == "worker started" and not warm
            ]
            rss = benchlib.rss_kib(worker.pid)
            fleet.stop_workers()
            fleet.assert_all_done(rows)
            check_secrets(fleet, run, rows, moto)
            rids = tuple(fleet.rotation_ids[name] for name in measured)
            firsts = {
                r: at
                for r, at in fleet.reader.query(
                    "SELECT rotation_id, min(intent_at) FROM actions GROUP BY rotation_id"
                )
                if r in rids
            }
            finals = {
                r: at
                for r, at in fleet.reader.query(
                    "SELECT rotation_id, max(at) FROM events WHERE kind = 'transition' "
                    "AND to_state = 'old_deactivated' GROUP BY rotation_id"
                )
                if r in rids
            }
            actions = [
                row
                for row in fleet.reader.query(
                    "SELECT rotation_id, name, intent_at, outcome_at, attempts FROM actions"
                )
                if row[0] in rids
            ]
            last_finish = max(
                at
                for r, at in fleet.reader.query("SELECT id, finished_at FROM rotations")
                if r in rids
            )
            warnings = [
                line["event"] for line in worker.lines() if line.get("log_level") == "warning"
            ]
        finally:
            fleet.kill_workers()
            fleet.sandbox.stop()
    assert set(firsts) == set(finals) == set(rids)
    spans = [epoch(finals[r]) - epoch(firsts[r]) for r in rids]
    by_action: dict[str, list[float]] = {}
    retried = 0
    for _rid, name, intent, outcome, attempts in actions:
        if outcome is not None:
            # the file targets make_fleet adds are named after their paths: one row for all
            name = re.sub(r"@file:.*$", "@file", name)
            by_action.setdefault(name, []).append(epoch(outcome) - epoch(intent))
        retried += int(attempts) > 1
    ops = Counter(after["by_operation"]) - Counter(before["by_operation"])
    # per rotation: time inside actions (intent -> outcome) and between them (an outcome to the
    # next intent: the commits, the engine's own work, waiting for the event loop)
    inside, between = [], []
    by_rotation: dict[str, list[tuple[float, float]]] = {}
    for rid, _name, intent, outcome, _attempts in actions:
        if outcome is not None:
            by_rotation.setdefault(rid, []).append((epoch(intent), epoch(outcome)))
    for rid, rows_ in by_rotation.items():
        rows_.sort()
        inside.append(sum(b - a for a, b in rows_))
        between.append(sum(rows_[i + 1][0] - rows_[i][1] for i in range(len(rows_) - 1))
                       + (epoch(finals[rid]) - rows_[-1][1]))  # fmt: skip
    finish = epoch(last_finish)
    return {
        "n": n,
        "wall_s": finish - t0,
        "startup_s": (started[0] - t0) if started else None,
        "after_startup_s": (finish - started[0]) if started else None,
        "aws_requests": after["forwarded"] - before["forwarded"],
        "aws_by_operation": {
            k.removeprefix("secretsmanager."): round(v / n, 2) for k, v in sorted(ops.items())
        },
        "proxy_max_in_flight": after["max_in_flight"],
        # CPU seconds each process spent from the worker's start to the last finish (the
        # worker's own include its start-up); the machine's 1-minute load before and after
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "worker_runqueue_wait_s": round(waited, 2),
        "worker_system_cpu_s": round(worker_system, 2),
        "load_1min": [round(load_before, 2), round(load_after, 2)],
        "span_s": spans,
        "inside_actions_s": sum(inside) / len(inside),
        "between_actions_s": sum(between) / len(between),
        "action_s": {k: sum(v) / len(v) for k, v in by_action.items()},
        "actions_retried": retried,
        "worker_rss_kib": rss,
        "warnings": sorted(set(warnings)),
    }


def test_aws_target_throughput(tmp_path: Path) -> None:
    n = benchlib.env_int("BENCH_AWS_FLEET", 128)
    concurrency = benchlib.env_int("BENCH_CONCURRENCY", 64)
    delay_ms = benchlib.env_float("BENCH_AWS_DELAY_MS", 200)
    repeats = max(1, benchlib.env_int("BENCH_AWS_SINGLE_RUNS", 3))
    moto = start_moto(tmp_path)
    proxy = start_delay_proxy(moto.url, delay_ms, tmp_path)
    try:
        singles = []
        for i in range(repeats):
            (tmp_path / f"single{i}").mkdir()
            singles.append(
                run_fleet(tmp_path / f"single{i}", 1, concurrency, moto, proxy, warm_up=True)
            )
        (tmp_path / "fleet").mkdir()
        many = run_fleet(tmp_path / "fleet", n, concurrency, moto, proxy)
    finally:
        proxy.stop()
        moto.stop()

    # the median of the single runs (each: one credential, its own worker, same proxy)
    criticals = sorted(one["span_s"][0] for one in singles)
    critical = criticals[len(criticals) // 2]
    one = next(one for one in singles if one["span_s"][0] == critical)
    per_rotation = one["aws_requests"] / one["n"]
    aws_floor = per_rotation * delay_ms / 1000
    rate = n / many["wall_s"]
    ideal = concurrency / critical
    ratio = rate / ideal
    rate_after = n / many["after_startup_s"] if many["after_startup_s"] else None
    spans = many["span_s"]
    table = [
        ("rotations (N)", n),
        ("worker concurrency", concurrency),
        ("AWS delay per request (ms)", delay_ms),
        ("AWS requests / rotation, alone", round(per_rotation, 2)),
        ("AWS requests / rotation, fleet", round(many["aws_requests"] / n, 2)),
        ("  x delay = AWS share of critical path (s)", round(aws_floor, 3)),
        (f"critical path, one rotation alone (s), median of {repeats}", round(critical, 3)),
        ("  (each in a worker warmed by one rotation before)", ""),
        ("  each single run (s)", " / ".join(f"{c:.3f}" for c in criticals)),
        ("wall, worker start -> last finish (s)", round(many["wall_s"], 2)),
        ("  of it worker start-up (s)", round(many["startup_s"] or 0, 2)),
        ("rotations/s", round(rate, 3)),
        ("rotations/s after start-up", round(rate_after, 3) if rate_after else None),
        ("concurrency / critical path (rot/s)", round(ideal, 3)),
        ("ratio", round(ratio, 3)),
        (f"ratio >= {GOAL}", ratio >= GOAL),
        ("ratio after start-up", round(rate_after / ideal, 3) if rate_after else None),
        ("mean time inside / between actions, alone (s)",
         f"{one['inside_actions_s']:.3f} / {one['between_actions_s']:.3f}"),
        ("mean time inside / between actions, fleet (s)",
         f"{many['inside_actions_s']:.3f} / {many['between_actions_s']:.3f}"),
        ("fleet rotation span p50 / p99 (s)",
         f"{benchlib.percentile(spans, 50):.2f} / {benchlib.percentile(spans, 99):.2f}"),
        ("proxy max requests in flight", many["proxy_max_in_flight"]),
        ("fleet CPU s: worker/sandbox/moto/proxy/postgres",
         " / ".join(str(many["cpu_s"][k])
                    for k in ("worker", "sandbox", "moto", "proxy", "postgres"))),
        ("fleet CPU s / rotation, all of them",
         round(sum(many["cpu_s"].values()) / n, 4)),
        ("fleet worker CPU s / rotation", round(many["cpu_s"]["worker"] / n, 4)),
        ("  of it in the kernel (s)", round(many["worker_system_cpu_s"] / n, 4)),
        ("fleet worker threads' run-queue wait (s)", many["worker_runqueue_wait_s"]),
        ("machine load (1 min) before / after fleet",
         " / ".join(str(x) for x in many["load_1min"])),
    ]  # fmt: skip
    width = max(len(k) for k, _ in table)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in table))
    print(f"\n{'action (intent -> outcome, mean s)':<{width}}  alone   fleet")
    for action, alone in one["action_s"].items():
        print(f"{action:<{width}}  {alone:6.3f}  {many['action_s'].get(action, 0):6.3f}")
    benchlib.write_result(
        "aws_target",
        {
            "command": f"BENCH_AWS_FLEET={n} BENCH_CONCURRENCY={concurrency} "
            f"BENCH_AWS_DELAY_MS={delay_ms:g} BENCH_AWS_SINGLE_RUNS={repeats} "
            ".venv/bin/pytest -q -s tests/bench/test_aws_target.py",
            "targets_per_credential": ["file (from make_fleet)", "aws_secrets_manager"],
            "sandbox_latency_ms": 0,
            "table": dict(table),
            "single_median": {k: v for k, v in one.items() if k != "span_s"},
            "fleet": {k: v for k, v in many.items() if k != "span_s"},
        },
    )
