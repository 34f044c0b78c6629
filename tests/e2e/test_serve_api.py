"""`keyturn serve` over HTTP: a real process on a real installation (sandbox, SQLite), its store
seeded with rotations in every state and every status.

- the authorization matrix: every endpoint and verb (approve, deny, release-lease, /v1/plan and
  /v1/credentials/{name} included) x viewer, operator, admin, no token and a revoked token;
- If-Match: a stale revision gets 412, a missing one 428; a running rotation whose lease renews
  and whose actions commit keeps its revision, and so does one held by a real worker whose
  lease renews between the read and the verb;
- release-lease with real worker processes: a live holder honours it at its next action
  boundary; a frozen (SIGSTOP) holder's rotation is claimed only after its original expiry;
- the list's filters and cursor, credentials and the plan against the CLI's --json;
- Idempotency-Key: the same key and body replay the first response (one timeline event); a
  different body under the same key is 422;
- retry-now skips a backoff, and says why when refused (API and CLI);
- Schemathesis against /openapi.json with an operator token: no 5xx, every response matches
  the schema, and every operation got at least one 2xx;
- no response contains key material or a token (keyturn.testing.secret_scan).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import KEYTURN, PAT, SA, Kt, KtFactory, transitions_once

from keyturn.adapters.store.migrate import downgrade, head_revision, open_store, upgrade
from keyturn.adapters.store.sql import SqlStore
from keyturn.cli.wiring import SystemClock
from keyturn.domain.lifecycle import State
from keyturn.domain.model import (
    ActionRecord,
    ActionStatus,
    ManagedCredential,
    OperatorAction,
    OperatorRequest,
    Phase,
    Role,
)
from keyturn.engine.access import create_token
from keyturn.engine.operator import start_rotation
from keyturn.engine.registry import discovered
from keyturn.ports import Change
from keyturn.testing.secret_scan import scan_bytes

ROLES = ("viewer", "operator", "admin")
VERBS = ("resume", "pause", "cancel", "rollback", "retry-now", "approve", "deny", "release-lease")
#: The least role of each verb (the others: operator).
VERB_ROLE = {"release-lease": "admin"}


@dataclass
class Api:
    kt: Kt
    base: str
    proc: subprocess.Popen[str]
    tokens: dict[str, str]
    ids: dict[str, str]
    #: every response body this module received, for the secret scan
    bodies: list[bytes] = field(default_factory=list)

    def call(
        self, method: str, path: str, who: str | None = "operator", **kw: Any
    ) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if who is not None:
            headers["Authorization"] = f"Bearer {self.tokens[who]}"
        r = httpx.request(method, self.base + path, headers=headers, timeout=30, **kw)
        self.bodies.append(r.content)
        return r

    def revision(self, rid: str) -> str:
        return str(self.call("GET", f"/v1/rotations/{rid}").json()["revision"])

    def verb(
        self, rid: str, verb: str, *, reason: str = "api test", **headers: str
    ) -> httpx.Response:
        return self.call(
            "POST", f"/v1/rotations/{rid}/{verb}", json={"reason": reason}, headers=headers
        )

    def store(self) -> SqlStore:
        return open_store(self.kt.database_url)


def _seed(kt: Kt) -> dict[str, str]:
    """Rotations in several states and statuses, on credentials that share the SA's key (no
    worker runs while the API is tested, so nothing moves them but the test)."""
    store = open_store(kt.database_url)
    registry, clock = discovered(), SystemClock()
    now = clock.now()
    sa = store.get_credential(SA)
    ids: dict[str, str] = {}

    def rotation(name: str, **updates: Any) -> str:
        store.add_credential(
            ManagedCredential(
                name=f"seed-{name}",
                kind=sa.kind,
                provider=sa.provider,
                credential_id=f"cid-{name}",
                credential_uuid=f"cr-{name}",
                key_ref=sa.key_ref,
                algorithm=sa.algorithm,
            ),
            [],
        )
        r = start_rotation(
            store, registry, clock, credential=f"seed-{name}", reason=f"seed {name}",
            actor="test", options={},
        )  # fmt: skip
        if updates:
            r = store.commit(Change(r.id, r.version, updates=updates))
        ids[name] = r.id
        return r.id

    rotation("due")
    rotation("cancel-me")
    rotation("retrying", attempts=2, last_error="provider answered 503",
             next_attempt_at=now + timedelta(hours=1))  # fmt: skip
    # a configured credential (its targets and probes plan a rollback), halted in new_added
    pat = store.get_rotation(kt.rotate_here(PAT))
    halt = {"state": State.NEW_ADDED, "attempts": 5, "halted_reason": "retry budget spent: 503"}
    ids["halted"] = store.commit(Change(pat.id, pat.version, updates=halt)).id
    for n in (1, 2, 3):  # for Schemathesis: rotations kept for each verb, that it applies to
        rotation(f"for-retry-now-{n}", attempts=1, next_attempt_at=now + timedelta(hours=1))
        rotation(f"for-resume-{n}", attempts=5, halted_reason="retry budget spent: 429")
        rotation(f"for-pause-{n}")
        rotation(f"for-cancel-{n}")
        rotation(f"for-rollback-{n}", state=State.NEW_ADDED)
    rotation("halted-2", attempts=5, halted_reason="retry budget spent: timeout")
    rotation("paused", paused=True)
    rotation("waiting", state=State.VERIFIED, wait_key="forward.probe", wait_for="holder probes",
             wait_since=now, wait_deadline=now + timedelta(hours=1),
             next_attempt_at=now + timedelta(minutes=5))  # fmt: skip
    rotation("running", state=State.NEW_ADDED, lease_owner="worker-elsewhere",
             lease_expires_at=now + timedelta(hours=1))  # fmt: skip
    rid = rotation("requested", lease_owner="worker-elsewhere",
                   lease_expires_at=now + timedelta(hours=1))  # fmt: skip
    store.request(
        rid,
        OperatorRequest(OperatorAction.PAUSE, "someone", "seeded request", now),
        _event(rid, now),
    )
    rotation("rolled-back", state=State.ROLLED_BACK, finished_at=now)
    # every state and status: awaiting approval, verified, rolling back, cancelled, holder lost
    approval = {"wait_key": "gate.approval.before_start", "wait_for": "an approval (policy p)",
                "wait_since": now, "wait_deadline": now + timedelta(hours=4),
                "next_attempt_at": now + timedelta(minutes=5)}  # fmt: skip
    rotation("awaiting-approval", **approval)
    rotation("verified", state=State.VERIFIED, attempts=1, last_error="probe timed out",
             next_attempt_at=now + timedelta(hours=1))  # fmt: skip
    rotation("rolling-back", state=State.ROLLING_BACK, rollback_from=State.NEW_ADDED,
             halted_reason="retry budget spent: 500")  # fmt: skip
    rotation("cancelled", state=State.CANCELLED, finished_at=now)
    rotation("holder-lost", state=State.NEW_ADDED, lease_owner="worker-gone",
             lease_expires_at=now - timedelta(minutes=10))  # fmt: skip
    for n in (1, 2, 3):
        rotation(f"for-approve-{n}", **approval)
        rotation(f"for-deny-{n}", **approval)
        rotation(f"for-release-lease-{n}", state=State.NEW_ADDED, lease_owner="worker-busy",
                 lease_expires_at=now + timedelta(hours=1))  # fmt: skip
    store.close()
    return ids


def _event(rid: str, now: datetime) -> Any:
    from keyturn.domain.model import Event

    return Event(rotation_id=rid, at=now, kind="operator", actor="someone", trigger="pause",
                 reason="seeded request", detail={"status": "requested"})  # fmt: skip


def _start_serve(kt: Kt, log: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [*KEYTURN, "serve", "--port", "0"],
        env=kt.env(),
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "listening on http://" in line, f"serve did not start: {line!r} {log.read_text()}"
    base = line.split("listening on ", 1)[1].split()[0]
    for _ in range(100):
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    return proc, base


# The tests that share the module's service run on one xdist worker, in file order: the service
# is started once, and the secret scan (last) sees every body the others received.
SHARED = pytest.mark.xdist_group("serve-api")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    base_dir = tmp_path_factory.mktemp("serve")
    factory = KtFactory(base_dir)
    try:
        kt = factory.make()
        kt.rotate(SA)
        assert kt.worker().returncode == 0  # one real rotation, done
        ids = _seed(kt)
        listed = kt.run("rotations", "list", "--credential", SA, "--json").stdout
        ids["done"] = json.loads(listed)[0]["id"]
        # one token through the CLI (it prints the token alone on stdout), the rest in process
        tokens = {"admin": kt.run("tokens", "create", "--role", "admin", "--name", "t-admin")
                  .stdout.strip()}  # fmt: skip
        store = open_store(kt.database_url)
        for who, role in (("viewer", Role.VIEWER), ("operator", Role.OPERATOR),
                          ("revoked", Role.ADMIN)):  # fmt: skip
            name = "t-gone" if who == "revoked" else f"t-{who}"
            tokens[who] = create_token(store, SystemClock(), name=name, role=role, actor="t")[1]
        store.close()
        kt.run("tokens", "revoke", "t-gone")
        tokens["bogus"] = "kt_" + "x" * 43
        # a policy for the plan (no worker runs here, so nothing fires)
        text = kt.config.read_text()
        for name in (SA, PAT):
            head = f"[credentials.{name}]\n"
            text = text.replace(head, f'{head}policy = "quarterly"\n')
        kt.config.write_text(text + '\n[policies.quarterly]\nevery = "90d"\n')
        proc, base = _start_serve(kt, base_dir / "serve.log")
        try:
            yield Api(kt, base, proc, tokens, ids)
        finally:
            proc.terminate()
            assert proc.wait(timeout=20) == 0
    finally:
        factory.close()


# --------------------------------------------------------------------------- the matrix


def _endpoints(api: Api) -> list[tuple[str, str, str]]:
    """(method, path, the least role) of every operation of the API."""
    rid = api.ids["due"]
    reads = [
        ("GET", "/v1/rotations", "viewer"),
        ("GET", f"/v1/rotations/{rid}", "viewer"),
        ("GET", f"/v1/rotations/{api.ids['halted']}/rollback-plan", "viewer"),
        ("GET", "/v1/credentials", "viewer"),
        ("GET", f"/v1/credentials/{SA}", "viewer"),
        ("GET", "/v1/plan", "viewer"),
        ("GET", "/v1/workers", "viewer"),
        ("GET", "/v1/tokens", "admin"),
    ]
    return reads + [
        ("POST", f"/v1/rotations/{rid}/{v}", VERB_ROLE.get(v, "operator")) for v in VERBS
    ]


@SHARED
def test_authorization_matrix(api: Api) -> None:
    order = {"viewer": 0, "operator": 1, "admin": 2}
    spec = api.call("GET", "/openapi.json", who=None).json()
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    endpoints = _endpoints(api)
    templated = {
        (m, p.replace(api.ids["due"], "{rotation_id}").replace(api.ids["halted"], "{rotation_id}")
         .replace(f"/credentials/{SA}", "/credentials/{name}"))
        for m, p, _ in endpoints
    }  # fmt: skip
    assert documented - {("GET", "/healthz"), ("GET", "/readyz")} == templated
    for who in (None, "revoked", "bogus", *ROLES):
        for path in ("/healthz", "/readyz"):
            assert api.call("GET", path, who=who).status_code == 200
        for method, path, least in endpoints:
            # a wrong If-Match: a verb that passes authorization stops at 412, changing nothing
            kw = (
                {"json": {"reason": "matrix"}, "headers": {"If-Match": '"0"'}}
                if method == "POST"
                else {}
            )
            r = api.call(method, path, who=who, **kw)
            label = f"{who} {method} {path}: {r.status_code} {r.text[:200]}"
            if who in (None, "revoked", "bogus"):
                assert r.status_code == 401, label
                assert r.headers["WWW-Authenticate"] == "Bearer"
            elif order[who] < order[least]:
                assert r.status_code == 403, label
            else:
                assert r.status_code in ((412,) if method == "POST" else (200,)), label


# ---------------------------------------------------------------------------- If-Match


@SHARED
def test_if_match_stale_is_412_and_lease_renewals_keep_the_revision(api: Api) -> None:
    rid = api.ids["running"]
    before = api.revision(rid)
    store = api.store()
    try:
        r = store.get_rotation(rid)
        now = datetime.now(UTC)
        # the holder renews its lease, and commits an action's intent and its outcome
        r = store.commit(
            Change(rid, r.version, updates={"lease_expires_at": now + timedelta(hours=2)})
        )
        record = ActionRecord(
            rid, Phase.FORWARD, "register", f"idem-{rid}", ActionStatus.INTENT, now
        )
        r = store.commit(Change(rid, r.version, action=record))
        done = ActionRecord(
            rid, Phase.FORWARD, "register", f"idem-{rid}", ActionStatus.DONE, now, now
        )
        r = store.commit(Change(rid, r.version, action=done))
    finally:
        store.close()
    assert api.revision(rid) == before
    got = api.call("GET", f"/v1/rotations/{rid}")
    assert got.headers["ETag"] == f'"{before}"'
    detail = got.json()
    assert detail["lease"]["owner"] == "worker-elsewhere" and detail["version"] == r.version
    assert [a["status"] for a in detail["actions"]] == ["done"]

    missing = api.verb(rid, "pause")
    assert missing.status_code == 428, missing.text
    paused = api.verb(rid, "pause", **{"If-Match": f'"{before}"'})
    assert paused.status_code == 202, paused.text  # the holder carries it out
    assert paused.json()["outcome"] == "requested"
    stale = api.verb(rid, "pause", **{"If-Match": f'"{before}"'})
    assert stale.status_code == 412, stale.text
    assert "changed since you read it" in stale.json()["detail"]


# ---------------------------------------------------------------------- Idempotency-Key


@SHARED
def test_idempotent_replay_and_key_reuse(api: Api) -> None:
    rid = api.ids["halted-2"]
    rev = api.revision(rid)
    headers = {"If-Match": rev, "Idempotency-Key": "resume-once-1"}
    first = api.verb(rid, "resume", reason="fixed the provider", **headers)
    assert first.status_code == 200, first.text
    assert first.json()["outcome"] == "applied"
    again = api.verb(rid, "resume", reason="fixed the provider", **headers)
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    other = api.verb(rid, "resume", reason="another reason", **headers)
    assert other.status_code == 422, other.text
    timeline = api.call("GET", f"/v1/rotations/{rid}").json()["timeline"]
    resumes = [e for e in timeline if e["trigger"] == "resume"]
    assert [(e["actor"], e["reason"], e["detail"]["status"]) for e in resumes] == [
        ("t-operator", "fixed the provider", "requested"),
        ("t-operator", "fixed the provider", "applied"),
    ]


# --------------------------------------------------------------------------- retry-now


@SHARED
def test_retry_now_skips_the_backoff_and_says_why_when_refused(api: Api) -> None:
    rid = api.ids["retrying"]
    detail = api.call("GET", f"/v1/rotations/{rid}").json()
    assert detail["status"] == "retrying" and detail["attempt"]["n"] == 2
    assert detail["attempt"]["next_attempt_at"] == detail["next_attempt_at"]
    ok = api.verb(rid, "retry-now", reason="provider is back", **{"If-Match": detail["revision"]})
    assert ok.status_code == 200, ok.text
    after = api.call("GET", f"/v1/rotations/{rid}").json()
    assert datetime.fromisoformat(after["next_attempt_at"]) <= datetime.now(UTC)
    assert after["timeline"][-1]["actor"] == "t-operator"
    assert after["timeline"][-1]["detail"]["status"] == "applied"

    halted = api.ids["halted"]
    refused = api.verb(halted, "retry-now", **{"If-Match": api.revision(halted)})
    assert refused.status_code == 409
    assert "halted" in refused.json()["detail"] and "resume it instead" in refused.json()["detail"]
    last = api.call("GET", f"/v1/rotations/{halted}").json()["timeline"][-1]
    assert last["trigger"] == "retry-now" and last["detail"]["status"].startswith("refused: ")

    cli = api.kt.run("rotations", "retry-now", api.ids["paused"], "--reason", "x", check=False)
    assert cli.returncode == 1
    assert cli.stderr.startswith("keyturn: error: cannot retry-now a rotation in state pending: ")
    assert "paused; resume it instead" in cli.stderr and len(cli.stderr.splitlines()) == 1


# --------------------------------------------------------------------------- listing


@SHARED
def test_list_filters_and_cursor_paging(api: Api) -> None:
    everything = api.call("GET", "/v1/rotations", params={"limit": 200}).json()["items"]
    pages, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = api.call("GET", "/v1/rotations", params=params).json()
        pages += [r["id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [r["id"] for r in everything]
    assert len(pages) == len(set(pages)) >= 10
    halted = api.call("GET", "/v1/rotations", params={"status": "halted"}).json()["items"]
    assert api.ids["halted"] in {r["id"] for r in halted}
    attention = api.call("GET", "/v1/rotations", params={"attention": "true"}).json()["items"]
    assert {r["id"] for r in attention} >= {api.ids["halted"]}
    assert all(r["attention"] for r in attention)
    bad = api.call("GET", "/v1/rotations", params={"cursor": "nope"})
    assert bad.status_code == 400 and bad.json()["detail"].startswith("cursor is not one")
    # the seeded store has rotations in every state and every status
    from keyturn.engine.attention import STATUSES

    assert {r["status"] for r in everything} == set(STATUSES)
    assert {r["state"] for r in everything} == {s.value for s in State}
    for status in STATUSES:  # each filter gives exactly that status, in the list's order
        only = api.call("GET", "/v1/rotations", params={"status": status, "limit": 200})
        assert [r["id"] for r in only.json()["items"]] == [
            r["id"] for r in everything if r["status"] == status
        ]


def _times(doc: Any) -> Any:
    """`doc` with every ISO 8601 time parsed (the API writes Z, the CLI +00:00)."""
    if isinstance(doc, dict):
        return {k: _times(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_times(v) for v in doc]
    if isinstance(doc, str) and len(doc) >= 20 and doc[4] == "-" and doc[10] == "T":
        try:
            return datetime.fromisoformat(doc)
        except ValueError:
            return doc
    return doc


@SHARED
def test_credentials_and_plan_say_what_the_cli_says(api: Api) -> None:
    listed = _times(api.call("GET", "/v1/credentials").json())
    cli = {
        c["name"]: c for c in _times(json.loads(api.kt.run("credentials", "list", "--json").stdout))
    }
    assert [c["name"] for c in listed] == sorted(cli)
    moving = {"key_age_seconds"}
    for c in listed:
        same = {k: v for k, v in cli[c["name"]].items() if k not in moving}
        assert {k: c[k] for k in same} == same, c["name"]
        assert c["key_age_seconds"] is not None and c["key_age_seconds"] >= 0
    sa = next(c for c in listed if c["name"] == SA)
    assert sa["targets"] == [{"type": "file", "name": "local-files"}], sa["targets"]
    assert sa["latest_rotation"]["state"] == "old_deactivated"
    assert sa["last_completed_at"] is not None and sa["policy"] == "quarterly"
    assert sa["next_rotation_at"] is not None
    one = api.call("GET", f"/v1/credentials/{SA}")
    assert one.status_code == 200 and {**_times(one.json()), "key_age_seconds": 0} == {
        **sa,
        "key_age_seconds": 0,
    }
    assert api.call("GET", "/v1/credentials/nope").status_code == 404

    plan = api.call("GET", "/v1/plan", params={"until": "100d"})
    assert plan.status_code == 200, plan.text
    cli_plan = json.loads(api.kt.run("plan", "--until", "100d", "--json").stdout)

    def steady(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # the key's age is counted from "now" (on the schedule's clock): it moves a little
        return [{k: v for k, v in i.items() if k != "key_age_seconds"} for i in _times(items)]

    assert steady(plan.json()["rotations"]) == steady(cli_plan["rotations"])
    assert {r["credential"] for r in plan.json()["rotations"]} == {SA, PAT}
    assert plan.json()["rotations"][0]["actions"]  # the external calls, in order
    notes = plan.json()["notes"]
    assert notes == cli_plan["notes"] and any(n.startswith(f"{PAT}: rotation ") for n in notes)
    only = api.call("GET", "/v1/plan", params={"credential": SA, "until": "1d"}).json()
    assert only["rotations"] == []
    assert api.call("GET", "/v1/plan", params={"credential": "nope"}).status_code == 404
    bad = api.call("GET", "/v1/plan", params={"until": "soon"})
    assert bad.status_code == 400 and bad.json()["detail"].startswith("until 'soon' is not a date")


@SHARED
def test_approve_deny_and_release_lease_refusals(api: Api) -> None:
    rid = api.ids["awaiting-approval"]
    ok = api.verb(rid, "approve", reason="change ticket 42", **{"If-Match": api.revision(rid)})
    assert ok.status_code == 200, ok.text
    assert ok.json()["outcome"] == "applied" and ok.json()["status"] != "awaiting_approval"
    last = api.call("GET", f"/v1/rotations/{rid}").json()["timeline"][-1]
    assert (last["trigger"], last["actor"], last["detail"]["status"]) == (
        "approve", "t-operator", "applied"
    )  # fmt: skip
    due = api.ids["due"]
    no = api.verb(due, "deny", **{"If-Match": api.revision(due)})
    assert no.status_code == 409 and "not awaiting approval" in no.json()["detail"]
    # release-lease: admin only, and refused when no lease is held (API and CLI)
    as_operator = api.verb(due, "release-lease", **{"If-Match": api.revision(due)})
    assert as_operator.status_code == 403, as_operator.text
    refused = api.call(
        "POST", f"/v1/rotations/{due}/release-lease", who="admin", json={"reason": "x"},
        headers={"If-Match": api.revision(due)},
    )  # fmt: skip
    assert refused.status_code == 409 and "no worker holds its lease" in refused.json()["detail"]
    lost = api.ids["holder-lost"]
    cli = api.kt.run("rotations", "release-lease", lost, "--reason", "x", check=False)
    assert cli.returncode == 1 and len(cli.stderr.splitlines()) == 1
    assert cli.stderr.startswith("keyturn: error: cannot release-lease a rotation in state ")
    assert "expired at" in cli.stderr and "the next worker to poll claims it" in cli.stderr


# -------------------------------------------------------------------------- Schemathesis


@SHARED
def test_schemathesis_every_operation_gets_a_2xx_and_matches_its_schema(api: Api) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(api.base + "/openapi.json")
    auth = {"Authorization": f"Bearer {api.tokens['operator']}"}
    admin = {"Authorization": f"Bearer {api.tokens['admin']}"}
    suited = {verb: [api.ids[f"for-{verb}-{n}"] for n in (1, 2, 3)] for verb in VERBS}
    admin_only = {"GET /v1/tokens", "POST /v1/rotations/{rotation_id}/release-lease"}
    names = [SA, PAT, "seed-due", "seed-halted-2"]
    # a rollback plan needs a configured credential's rotation that can roll back
    suited["rollback-plan"] = [api.ids["halted"], api.ids["done"]]
    # the rotations kept for one verb are not offered to the others (a cancel or a pause would
    # take them out of what that verb applies to)
    kept = {rid for ids in suited.values() for rid in ids}
    seeded = sorted(set(api.ids.values()) - kept)
    ok: dict[str, int] = {}
    problems: list[str] = []

    def check(operation: Any, has_id: bool) -> None:
        label = operation.label

        @settings(max_examples=20, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(data=st.data())
        def run(data: st.DataObject) -> None:
            ids = st.sampled_from(seeded)
            verb = label.rsplit("/", 1)[1]
            if verb in suited:  # and often one it applies to
                ids = ids | st.sampled_from(suited[verb])
            path = {"rotation_id": data.draw(ids)} if has_id else None
            if "{name}" in operation.path:  # a credential: often a managed one
                path = {"name": data.draw(st.sampled_from(names) | st.text(min_size=1))}
            case = data.draw(operation.as_strategy(path_parameters=path))
            if label == "GET /v1/plan" and data.draw(st.booleans()):
                case.query = data.draw(st.sampled_from([{}, {"credential": SA}, {"until": "90d"}]))
            # the admin-only operation (token management) with the admin token, the rest as
            # an operator
            headers = dict(admin if label in admin_only else auth)
            if operation.method.upper() == "POST" and data.draw(st.sampled_from([0, 1, 1, 1])):
                headers["If-Match"] = api.revision(case.path_parameters["rotation_id"])
            response = case.call(base_url=api.base, headers=headers)
            api.bodies.append(response.content)
            if response.status_code >= 500:
                problems.append(f"{label}: {response.status_code} {response.text[:300]}")
            if 200 <= response.status_code < 300:
                ok[label] += 1
            try:
                # every check but "schema-valid data is accepted": a cursor is opaque and an
                # If-Match names a revision, which no schema can generate (400 and 412 here)
                case.validate_response(
                    response, headers=headers, excluded_checks=[positive_data_acceptance]
                )
            except AssertionError as exc:
                if response.status_code < 500:
                    problems.append(f"{label} {response.status_code}: {str(exc)[:500]}")

        run()

    for result in schema.get_all_operations():
        operation = result.ok()
        label = operation.label
        ok.setdefault(label, 0)
        has_id = "{rotation_id}" in operation.path

        check(operation, has_id)
    assert not problems, "\n".join(problems[:10])
    assert ok and all(ok.values()), f"operations with no 2xx: {[k for k, v in ok.items() if not v]}"


# -------------------------------------------------------------------------- secret scan


@SHARED
def test_no_response_contains_key_material_or_a_token(api: Api) -> None:
    # last in the module: scans every body the tests above received, and a fresh read of all
    reads = ("/v1/rotations?limit=200", "/v1/credentials", f"/v1/credentials/{SA}",
             f"/v1/credentials/{PAT}", "/v1/plan", "/v1/workers", "/v1/tokens")  # fmt: skip
    for path in reads:
        api.call("GET", path, who="admin")
    for rid in api.ids.values():
        api.call("GET", f"/v1/rotations/{rid}", who="admin")
    key, _ = api.kt.deployed(SA)
    secrets: dict[str, bytes | str] = {"deployed key": key}
    secrets |= {f"token {who}": t for who, t in api.tokens.items() if who != "bogus"}
    sandbox = api.kt.bootstrap
    secrets |= {
        "SA bearer": sandbox["service_account"]["token"],
        "PAT bearer": sandbox["pat"]["token"],
    }
    found = [f for body in api.bodies for f in scan_bytes(body, secrets)]
    assert not found, "\n".join(str(f) for f in found[:5])
    # the bodies of the module's other tests (the schemathesis run alone gives hundreds): run
    # this test with them, as the xdist group does
    assert len(api.bodies) > 100, f"only {len(api.bodies)} bodies: run the whole module"


# ----------------------------------------------------------------- serve --worker, ports


def test_serve_with_a_worker_rotates_and_stops_cleanly(make_kt: Any, tmp_path: Path) -> None:
    import socket

    kt = make_kt()
    token = kt.run("tokens", "create", "--role", "viewer", "--name", "ops").stdout.strip()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        taken = kt.run("serve", "--port", str(port), check=False)
    assert taken.returncode == 2  # a server that cannot start
    assert taken.stderr.startswith(f"keyturn: error: cannot listen on 127.0.0.1:{port} (")
    assert len(taken.stderr.splitlines()) == 1

    proc = subprocess.Popen(
        [*KEYTURN, "serve", "--port", "0", "--worker"],
        env=kt.env(),
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "serve.log").open("w"),
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "with a worker" in line, (tmp_path / "serve.log").read_text()
        base = line.split("listening on ", 1)[1].split()[0]
        auth = {"Authorization": f"Bearer {token}"}
        rid = kt.rotate(SA)
        deadline = time.monotonic() + 60
        state = None
        while time.monotonic() < deadline:
            state = httpx.get(f"{base}/v1/rotations/{rid}", headers=auth, timeout=10).json()
            if state["state"] == "old_deactivated":
                break
            time.sleep(0.2)
        assert state is not None and state["state"] == "old_deactivated", state
        workers = httpx.get(f"{base}/v1/workers", headers=auth, timeout=10).json()
        assert [w["status"] for w in workers] == ["live"]
        # /readyz says when the schema is not the one this keyturn needs (and healthz does not)
        assert httpx.get(f"{base}/readyz", timeout=10).json()["status"] == "ready"
        head = head_revision()
        downgrade(kt.database_url, "-1")  # (the head's number changes at merges; never named)
        try:
            not_ready = httpx.get(f"{base}/readyz", timeout=10)
            assert not_ready.status_code == 503
            said = not_ready.json()["detail"]
            assert "not migrated (at " in said
            assert f"needs {head}); run `keyturn db upgrade`" in said
            assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        finally:
            upgrade(kt.database_url)
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
    assert [w["status"] for w in json.loads(kt.run("workers", "--json").stdout)] == ["stopped"]


@pytest.mark.postgres
def test_serve_on_postgres(make_kt: Any, fresh_pg_url: str, tmp_path: Path) -> None:
    """The same store calls on PostgreSQL: token lookup, a verb with If-Match and an
    Idempotency-Key, its replay, a stale revision, the audit event."""
    kt = make_kt(db_url=fresh_pg_url)
    token = kt.run("tokens", "create", "--role", "operator", "--name", "pg-op").stdout.strip()
    rid = kt.rotate(PAT)
    proc, base = _start_serve(kt, tmp_path / "serve.log")
    auth = {"Authorization": f"Bearer {token}"}
    try:
        rev = httpx.get(f"{base}/v1/rotations/{rid}", headers=auth, timeout=10).json()["revision"]
        headers = {**auth, "If-Match": f'"{rev}"', "Idempotency-Key": "pg-1"}
        url, body = f"{base}/v1/rotations/{rid}/pause", {"reason": "change freeze"}
        first = httpx.post(url, json=body, headers=headers, timeout=10)
        assert first.status_code == 200, first.text
        again = httpx.post(url, json=body, headers=headers, timeout=10)
        assert (again.status_code, again.json()) == (200, first.json())
        stale = httpx.post(url, json=body, headers={**headers, "Idempotency-Key": "pg-2"})
        assert stale.status_code == 412, stale.text
        page = httpx.get(f"{base}/v1/rotations", params={"status": "paused"}, headers=auth).json()
        assert [r["id"] for r in page["items"]] == [rid]
        events = httpx.get(f"{base}/v1/rotations/{rid}", headers=auth).json()["timeline"]
        assert [(e["actor"], e["detail"]["status"]) for e in events if e["trigger"] == "pause"] == [
            ("pg-op", "requested"),
            ("pg-op", "applied"),
        ]
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0


# ------------------------------------------- real workers: If-Match, release-lease, fencing


def _poll(what: Any, until: Any, timeout: float = 30, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    got = what()
    while not until(got):
        assert time.monotonic() < deadline, f"timed out; last: {str(got)[:1500]}"
        time.sleep(every)
        got = what()
    return got


def test_real_workers_if_match_and_release_lease(make_kt: Any, tmp_path: Path) -> None:
    """With `keyturn worker` processes, the sandbox slowed so a worker holds a rotation
    mid-call (renewing its lease): a verb with the revision read before a renewal is not 412;
    release-lease to a live holder is a request it honours at its next action boundary; to a
    frozen (SIGSTOP) holder it never cuts the lease short: another worker claims the rotation
    only after the original expiry, and the frozen one, continued, writes nothing."""
    import os
    import signal

    kt = make_kt()
    kt.patch_config("lease_seconds = 2", "lease_seconds = 9")  # heartbeat 3 s, stale after 6
    admin = kt.run("tokens", "create", "--role", "admin", "--name", "on-call").stdout.strip()
    proc, base = _start_serve(kt, tmp_path / "serve.log")
    auth = {"Authorization": f"Bearer {admin}"}
    workers: list[subprocess.Popen[str]] = []

    def get(rid: str) -> dict[str, Any]:
        r = httpx.get(f"{base}/v1/rotations/{rid}", headers=auth, timeout=10)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def verb(rid: str, name: str, rev: str) -> httpx.Response:
        return httpx.post(f"{base}/v1/rotations/{rid}/{name}", json={"reason": "on-call test"},
                          headers={**auth, "If-Match": f'"{rev}"'}, timeout=30)  # fmt: skip

    def start_worker(n: int) -> subprocess.Popen[str]:
        w = subprocess.Popen([*KEYTURN, "worker"], env=kt.env(), text=True,
                             stdout=subprocess.DEVNULL,
                             stderr=(tmp_path / f"worker-{n}.log").open("w"))  # fmt: skip
        workers.append(w)
        return w

    def holder_is(status: str) -> Callable[[dict[str, Any]], bool]:
        return lambda d: bool(d["lease"]) and d["lease"]["holder"]["status"] == status

    def held(rid: str) -> dict[str, Any]:
        return dict(_poll(lambda: get(rid), holder_is("live")))

    try:
        # --- a live holder: its lease renews between the read and the verb
        kt.sandbox.set_faults(latency_ms=6000)  # every provider call takes 6 s
        live = kt.rotate(SA)
        w1 = start_worker(1)
        first = held(live)
        renewed = _poll(lambda: get(live),
                        lambda d: d["lease"] and d["lease"]["expires_at"]
                        != first["lease"]["expires_at"], timeout=20)  # fmt: skip
        assert renewed["version"] > first["version"] and renewed["revision"] == first["revision"]
        owner = first["lease"]["owner"]
        asked = verb(live, "release-lease", first["revision"])
        assert asked.status_code == 202, asked.text
        assert asked.json()["outcome"] == "requested"
        assert "gives the lease back at its next action boundary" in asked.json()["message"]
        # the pending request is what the revision now says: the old one is stale
        stale = verb(live, "pause", first["revision"])
        assert stale.status_code == 412, stale.text
        kt.sandbox.set_faults(latency_ms=0)
        done = _poll(lambda: get(live), lambda d: d["state"] == "old_deactivated", timeout=60)
        said = [(e["actor"], e["detail"]["status"], e["detail"].get("lease"),
                 e["detail"].get("holder")) for e in done["timeline"]
                if e["trigger"] == "release-lease"]  # fmt: skip
        assert said == [("on-call", "requested", None, owner),
                        ("on-call", "applied", "released", owner)], said  # fmt: skip
        assert transitions_once({"events": done["timeline"]})

        # --- a silent holder (SIGSTOP): claimable only after the lease it holds expires
        kt.sandbox.set_faults(latency_ms=6000)
        silent = kt.rotate(PAT)
        first = held(silent)
        frozen = next(w for w in workers if w.poll() is None)
        assert first["lease"]["holder"]["pid"] == frozen.pid == w1.pid
        os.kill(frozen.pid, signal.SIGSTOP)
        stopped = _poll(lambda: get(silent), holder_is("stale"), timeout=20)
        expiry = datetime.fromisoformat(stopped["lease"]["expires_at"])
        assert datetime.now(UTC) < expiry, "the lease expired before the holder went stale"
        asked = verb(silent, "release-lease", stopped["revision"])
        assert asked.status_code == 202, asked.text
        assert "is not seen" in asked.json()["message"]
        assert "never cut short" in asked.json()["message"]
        kt.sandbox.set_faults(latency_ms=0)
        start_worker(2)
        while datetime.now(UTC) < expiry - timedelta(seconds=0.5):
            lease = get(silent)["lease"]
            assert lease["owner"] == first["lease"]["owner"], "claimed before the lease expired"
            time.sleep(0.2)
        done = _poll(lambda: get(silent), lambda d: d["state"] == "old_deactivated", timeout=60)
        taken = datetime.fromisoformat(done["lease"]["taken_at"]) if done["lease"] else None
        applied = [e for e in done["timeline"] if e["trigger"] == "release-lease"][-1]
        assert applied["detail"]["status"] == "applied" and applied["detail"]["lease"] == "expired"
        assert applied["detail"]["holder"] == first["lease"]["owner"]
        claims = [e for e in done["timeline"] if e["detail"].get("status") == "taken_over"]
        assert claims and datetime.fromisoformat(claims[0]["at"]) >= expiry, (claims, expiry)
        assert taken is None or taken >= expiry
        # the frozen holder, continued, finds its lease gone: it writes nothing more
        os.kill(frozen.pid, signal.SIGCONT)
        time.sleep(1.5)
        after = get(silent)
        assert after["version"] == done["version"] and after["state"] == "old_deactivated"
        assert transitions_once({"events": after["timeline"]})
    finally:
        for w in workers:
            if w.poll() is None:
                os.kill(w.pid, signal.SIGCONT)
                w.terminate()
        for w in workers:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.kill()
        proc.terminate()
        proc.wait(timeout=20)
