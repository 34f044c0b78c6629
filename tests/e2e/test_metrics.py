"""Prometheus metrics during a real run: a `keyturn worker --metrics-port 0` process and a
`keyturn serve` process on one installation (six service accounts on the sandbox, which fails
a share of requests with 500 and 429), scraped over HTTP while the rotations run and after.

- serve's /metrics (from the store at scrape time) says what the event log says: transitions
  by from/to/kind, operator actions by verb and outcome, rotations by state and status, the
  credentials' timestamps, the workers' heartbeats;
- the worker's own counters say what its events and the sandbox's request log say: step
  attempts by step and result, the durations' histogram, provider requests by outcome and
  errors by class;
- counters never go down between scrapes; the text parses (prometheus-client's parser) and
  passes `promtool check metrics`; no secret appears in it;
- who may read /metrics: ``[serve] metrics`` token (default), open, off; a bad value, a bad
  or taken --metrics-port: one line, exit 2, nothing started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleet import Fleet, WorkerProc, make_fleet
from harness import KEYTURN, requests_since
from prometheus_client.parser import text_string_to_metric_families

from keyturn.adapters.store.migrate import open_store
from keyturn.cli.wiring import SystemClock
from keyturn.domain.model import Role
from keyturn.engine.access import create_token
from keyturn.testing.secret_scan import scan_bytes

ACCOUNTS = 6
FAULTS = {"error_rate": 0.12, "rate_429": 0.1}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples_of(text: str) -> Samples:
    """(sample name, sorted labels) -> value, parsed by prometheus-client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@dataclass
class Run:
    fleet: Fleet
    worker: WorkerProc
    owner: str
    worker_url: str
    serve: subprocess.Popen[str]
    serve_url: str
    tokens: dict[str, str]
    #: every /metrics text scraped from the worker and from serve, in order
    worker_texts: list[str] = field(default_factory=list)
    serve_texts: list[str] = field(default_factory=list)
    #: the sandbox's request log during the run
    requests: list[dict[str, Any]] = field(default_factory=list)

    def scrape_serve(self, who: str | None = "viewer") -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.get(self.serve_url + "/metrics", headers=headers, timeout=30)

    def scrape(self) -> tuple[Samples, Samples]:
        w = httpx.get(self.worker_url, timeout=30)
        s = self.scrape_serve()
        assert w.status_code == 200 and s.status_code == 200, (w.text[:300], s.text[:300])
        assert s.headers["content-type"].startswith("text/plain; version=0.0.4")
        self.worker_texts.append(w.text)
        self.serve_texts.append(s.text)
        return samples_of(w.text), samples_of(s.text)


def _started_line(path: Path, proc: subprocess.Popen[Any], marker: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in path.read_text(errors="replace").splitlines():
            if marker in line:
                return line
        assert proc.poll() is None, f"exited {proc.returncode}: {path.read_text()[-2000:]}"
        time.sleep(0.05)
    raise AssertionError(f"no {marker!r} line: {path.read_text()[-2000:]}")


def start_serve(
    fleet: Fleet, log: Path, config: Path | None = None, *extra: str
) -> tuple[Any, str]:
    env = fleet.kt.env()
    if config is not None:
        env["KEYTURN_CONFIG"] = str(config)
    with log.open("w") as out:
        proc = subprocess.Popen([*KEYTURN, "serve", "--port", "0", *extra], env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    line = _started_line(log, proc, "listening on http://")
    return proc, line.split("listening on ", 1)[1].split()[0]


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    assert proc.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    base = tmp_path_factory.mktemp("metrics")
    fleet = make_fleet(base, ACCOUNTS, worker={"poll_seconds": 0.2, "backoff_base_seconds": 0.1})
    serve = None
    try:
        store = open_store(fleet.db_url)
        tokens = {}
        for who, role in (("viewer", Role.VIEWER), ("operator", Role.OPERATOR),
                          ("revoked", Role.ADMIN)):  # fmt: skip
            tokens[who] = create_token(store, SystemClock(), name=f"t-{who}", role=role,
                                       actor="test")[1]  # fmt: skip
        store.revoke_token("t-revoked", SystemClock().now())
        store.close()
        tokens["bogus"] = "kt_" + "x" * 43
        serve, serve_url = start_serve(fleet, base / "serve.log")
        worker = fleet.start_worker("--metrics-port", "0")
        line = _started_line(worker.log_path, worker.proc, "keyturn worker: metrics on ")
        worker_url = line.split("metrics on ", 1)[1].strip()
        assert worker_url.startswith("http://127.0.0.1:") and worker_url.endswith("/metrics")
        r = Run(fleet, worker, worker.owner(), worker_url, serve, serve_url, tokens)
        _drive(r)
        yield r
    finally:
        fleet.kill_workers()
        if serve is not None:
            _stop(serve)
        fleet.sandbox.stop()


def _monotonic(before: Samples, after: Samples) -> list[str]:
    """Counter and histogram samples that went down between two scrapes."""
    counted = ("_total", "_count", "_bucket", "_sum")
    return [
        f"{name}{dict(labels)}: {v} -> {after.get((name, labels))}"
        for (name, labels), v in before.items()
        if name.startswith("keyturn_") and name.endswith(counted)
        and after.get((name, labels), -1) < v
    ]  # fmt: skip


def _drive(r: Run) -> None:
    """Rotate every account under faults, scraping both processes all along; then roll one
    back through the API."""
    fleet = r.fleet
    seq, _ = requests_since(fleet.kt, 0)
    previous = r.scrape()
    assert total(previous[0], "keyturn_step_attempts_total") == 0
    # first every user-action signature fails (so steps fail and retry, for sure), then a
    # share of all requests does
    fleet.sandbox.set_faults(error_rate=1.0, paths=["POST /auth/action"])
    fleet.start_rotations()

    def settle(until: Any = None) -> None:
        nonlocal previous
        deadline = time.monotonic() + 120
        while True:
            rows = fleet.reader.rotations()
            now = r.scrape()
            assert _monotonic(previous[0], now[0]) == [] and _monotonic(previous[1], now[1]) == []
            previous = now
            if until() if until is not None else all(row.settled for row in rows.values()):
                return
            assert r.worker.proc.poll() is None, r.worker.tail()
            assert time.monotonic() < deadline, f"not settled: {rows}"
            time.sleep(0.3)

    def retried() -> bool:
        return any(str(e.detail.get("status")).startswith("retry") for e in fleet.reader.events())

    settle(until=retried)
    fleet.sandbox.set_faults(paths=[], **FAULTS)
    settle()
    fleet.sandbox.clear_faults()
    # an operator rollback of one finished rotation, through the API (carried out at once: no
    # worker holds it), then the worker's finish_rollback step
    rid = next(iter(fleet.rotation_ids.values()))
    headers = {"Authorization": f"Bearer {r.tokens['operator']}"}
    got = httpx.get(f"{r.serve_url}/v1/rotations/{rid}", headers=headers, timeout=30)
    verb = httpx.post(
        f"{r.serve_url}/v1/rotations/{rid}/rollback",
        json={"reason": "metrics test"},
        headers={**headers, "If-Match": got.headers["ETag"]},
        timeout=30,
    )
    assert verb.status_code == 200, verb.text
    settle()
    time.sleep(0.5)  # the worker's release of the last rotation is written with it
    settle()
    _, r.requests = requests_since(fleet.kt, seq)


# ------------------------------------------------------------------------------ serve


def test_serve_metrics_say_what_the_event_log_says(run: Run) -> None:
    _, s = samples_of(run.worker_texts[-1]), samples_of(run.serve_texts[-1])
    store = open_store(run.fleet.db_url)
    try:
        rotations = store.list_rotations()
        events = [(r, e) for r in rotations for e in store.events(r.id)]
        credentials = store.list_credentials()
        workers = store.list_workers()
    finally:
        store.close()
    assert len(rotations) == ACCOUNTS
    transitions = Counter(
        (e.from_state, e.to_state, r.kind) for r, e in events if e.kind == "transition"
    )
    shown = {
        (ls["from"], ls["to"], ls["kind"]): v
        for (n, labels), v in s.items()
        if n == "keyturn_transitions_total"
        for ls in [dict(labels)]
    }
    assert shown == dict(transitions)
    assert shown[("verified", "old_deactivated", "service_account")] == ACCOUNTS
    assert shown[("rolling_back", "rolled_back", "service_account")] == 1
    actions = Counter(
        (e.trigger, "refused" if str(e.detail.get("status", "")).startswith("refused") else
         e.detail.get("status", "applied"))
        for _, e in events if e.kind == "operator"
    )  # fmt: skip
    assert {k: total(s, "keyturn_operator_actions_total", verb=k[0], outcome=k[1])
            for k in actions} == dict(actions)  # fmt: skip
    assert actions[("create", "applied")] == ACCOUNTS and actions[("rollback", "requested")] == 1
    assert total(s, "keyturn_rotations", state="old_deactivated", status="done") == ACCOUNTS - 1
    assert total(s, "keyturn_rotations", state="rolled_back", status="done") == 1
    assert total(s, "keyturn_rotations") == ACCOUNTS
    assert total(s, "keyturn_attention_rotations") == 0
    assert total(s, "keyturn_store_up") == 1
    for c in credentials:
        key = ("keyturn_credential_key_created_timestamp_seconds", (("credential", c.name),))
        assert c.updated_at is not None and s[key] == pytest.approx(
            c.updated_at.timestamp(), abs=2e-3
        )
    done = {r.credential: r.finished_at for r in rotations if r.state.value == "old_deactivated"}
    assert {
        dict(ls)["credential"]: v
        for (n, ls), v in s.items()
        if n == "keyturn_rotation_last_success_timestamp_seconds"
    } == pytest.approx({c: at.timestamp() for c, at in done.items() if at is not None}, abs=2e-3)
    beat = ("keyturn_worker_last_heartbeat_timestamp_seconds", (("worker", run.owner),))
    assert {w.owner for w in workers} == {run.owner}
    assert abs(s[beat] - time.time()) < 30
    assert total(s, "keyturn_workers", status="live") == 1


# ----------------------------------------------------------------------------- worker


def test_worker_metrics_say_what_its_events_and_the_sandbox_log_say(run: Run) -> None:
    w = samples_of(run.worker_texts[-1])
    reader = run.fleet.reader
    mine = [e for e in reader.events() if e.actor == run.owner]
    ok = Counter(e.trigger for e in mine if e.kind == "transition")
    failed = Counter(
        (e.trigger, "halted" if e.detail["status"] == "halted" else "retry")
        for e in mine
        if e.kind == "run" and str(e.detail.get("status", "")).startswith(("retry", "halted"))
    )
    attempts = {
        (dict(ls)["step"], dict(ls)["result"]): v
        for (n, ls), v in w.items()
        if n == "keyturn_step_attempts_total"
    }
    assert {k: v for k, v in attempts.items() if k[1] == "ok"} == {
        (step, "ok"): n for step, n in ok.items()
    }
    assert {k: v for k, v in attempts.items() if k[1] in ("retry", "halted")} == dict(failed)
    assert attempts[("finish_rollback", "ok")] == 1
    assert sum(failed.values()) > 0, "the faults made no step fail: the retry count is untested"
    for step in {s for s, _ in attempts}:
        counted = sum(v for (s, _), v in attempts.items() if s == step)
        assert total(w, "keyturn_step_duration_seconds_count", step=step) == counted
        inf = ("keyturn_step_duration_seconds_bucket", (("le", "+Inf"), ("step", step)))
        assert w[inf] == counted
        assert total(w, "keyturn_step_duration_seconds_sum", step=step) > 0

    # every request the sandbox logged during the run, by outcome, and its errors by class
    logged = Counter(f"{int(q['status']) // 100}xx" for q in run.requests)
    by_outcome = {o: total(w, "keyturn_provider_requests_total", outcome=o) for o in logged}
    assert by_outcome == dict(logged)
    assert total(w, "keyturn_provider_requests_total") == len(run.requests)
    assert {dict(ls)["provider"] for (n, ls) in w if n == "keyturn_provider_requests_total"} \
        == {"sandbox"}  # fmt: skip
    statuses = Counter(int(q["status"]) for q in run.requests)
    assert total(w, "keyturn_provider_errors_total", **{"class": "rate_limited"}) \
        == statuses[429] > 0  # fmt: skip
    assert total(w, "keyturn_provider_errors_total", **{"class": "server_error"}) == sum(
        n for code, n in statuses.items() if code >= 500
    )
    assert total(w, "keyturn_provider_errors_total") == sum(
        n for code, n in statuses.items() if code >= 400
    )
    assert total(w, "process_cpu_seconds_total") > 0


# ------------------------------------------------------------------------ text format


def test_the_text_parses_passes_promtool_and_holds_no_secret(run: Run) -> None:
    assert len(run.serve_texts) >= 3 and len(run.worker_texts) >= 3
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (Debian package prometheus; .ci/run installs it)")
        pytest.skip("promtool is missing: apt-get install prometheus (CI fails instead)")
    for text in (run.serve_texts[-1], run.worker_texts[-1]):
        samples_of(text)  # parses
        checked = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                                 capture_output=True, check=False)  # fmt: skip
        assert checked.returncode == 0, checked.stdout + checked.stderr
    fleet = run.fleet
    secrets: dict[str, bytes | str] = {f"token {who}": t for who, t in run.tokens.items()
                                       if who != "bogus"}  # fmt: skip
    for name, acct in fleet.accounts.items():
        secrets[f"{name} old key"] = acct["private_key_pem"]
        secrets[f"{name} bearer"] = acct["token"]
        secrets[f"{name} new key"] = (fleet.kt.workdir / "deploy" / name / "private_key.pem") \
            .read_bytes()  # fmt: skip
    secrets["master key"] = (fleet.kt.workdir / "master.key").read_text().strip()
    found = [f for t in run.serve_texts + run.worker_texts for f in scan_bytes(t, secrets)]
    assert not found, "\n".join(str(f) for f in found[:5])
    # bounded labels: no rotation id, no error text
    ids = list(fleet.rotation_ids.values())
    assert not [i for i in ids if any(i in t for t in run.serve_texts + run.worker_texts)]
    assert "error" not in {v for t in run.serve_texts for (_, ls) in samples_of(t) for _, v in ls}


# ------------------------------------------------------------------------ who may read


def test_metrics_need_a_viewer_token_by_default_and_the_config_opens_or_closes_them(
    run: Run,
) -> None:
    assert run.scrape_serve(None).status_code == 401
    assert run.scrape_serve(None).headers["WWW-Authenticate"] == "Bearer"
    for who in ("revoked", "bogus"):
        assert run.scrape_serve(who).status_code == 401
    for who in ("viewer", "operator"):
        assert run.scrape_serve(who).status_code == 200
    assert httpx.get(run.serve_url + "/healthz").status_code == 200
    spec = httpx.get(run.serve_url + "/openapi.json").json()
    assert "/metrics" not in spec["paths"]

    kt = run.fleet.kt
    text = kt.config.read_text()
    started = []
    try:
        for mode, extra in (("open", ["--worker"]), ("off", [])):
            config = kt.workdir / f"keyturn-{mode}.toml"
            config.write_text(text + f'\n[serve]\nmetrics = "{mode}"\n')
            log = kt.workdir.parent / f"serve-{mode}.log"
            started.append(start_serve(run.fleet, log, config, *extra))
        (_, open_url), (_, off_url) = started
        opened = httpx.get(open_url + "/metrics", timeout=30)
        assert opened.status_code == 200
        assert total(samples_of(opened.text), "keyturn_rotations") == ACCOUNTS
        # serve --worker adds its worker's own counters (none yet: nothing is due)
        assert "# TYPE keyturn_step_attempts_total counter" in opened.text
        assert total(samples_of(opened.text), "process_cpu_seconds_total") > 0
        viewer = {"Authorization": f"Bearer {run.tokens['viewer']}"}
        assert httpx.get(off_url + "/metrics", headers=viewer, timeout=30).status_code == 404
        assert httpx.get(off_url + "/healthz", timeout=30).status_code == 200
    finally:
        for proc, _ in started:
            _stop(proc)

    bad = kt.workdir / "keyturn-bad.toml"
    bad.write_text(text + '\n[serve]\nmetrics = "public"\n')
    refused = kt.run("--config", str(bad), "serve", "--port", "0", check=False)
    assert refused.returncode != 0
    assert refused.stderr.startswith("keyturn: error: ") and "serve.metrics" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1, refused.stderr


def test_a_bad_or_taken_metrics_port_is_one_line(run: Run) -> None:
    import socket

    kt = run.fleet.kt
    store = open_store(run.fleet.db_url)
    try:
        registered = [w.owner for w in store.list_workers()]
    finally:
        store.close()
    bad = kt.run("worker", "--metrics-port", "70000", check=False)
    assert bad.returncode == 2
    assert bad.stderr == (
        "keyturn: error: --metrics-port 70000 is not a TCP port; use 1-65535, or 0 for a free one\n"
    )
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        taken = kt.run("worker", "--metrics-port", str(port), check=False)
    assert taken.returncode == 2
    assert taken.stderr.startswith(f"keyturn: error: cannot serve metrics on 127.0.0.1:{port} (")
    assert taken.stderr.endswith("pick another --metrics-host or --metrics-port\n")
    assert len(taken.stderr.splitlines()) == 1
    assert taken.stdout == ""
    # nothing started: no worker registered
    store = open_store(run.fleet.db_url)
    try:
        assert [w.owner for w in store.list_workers()] == registered
    finally:
        store.close()
