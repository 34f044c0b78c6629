"""A wait on a person, end to end on the shared test clock: real `keyturn worker` processes,
the toy kind asking a person to approve burning its old key, due 10 days after the invitation,
reminders 7 days and 1 day before, then daily, 2 snoozes of 8 hours allowed (the person uses 3:
a third would postpone the reminder to the deadline),
escalation to an owner's sink, and ``on_due = "report"``.

- the users' sink gets the invitation (user_task) and each reminder at its offset (the
  schedule time in the payload's ``at``, within one check interval), the second postponed by
  two snoozes only; the owner's sink gets the escalation at the deadline;
- a worker SIGKILLed between the reminders and restarted sends no reminder twice;
- past the deadline the rotation is left waiting, overdue in `rotations list --attention`, with
  no more reminders, and the toy's old key is still active (a person who never acts keeps it);
- the link is in what the users' sink received only: never in the database, the outbox, the
  events or the logs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from toyenv import KEYTURN, Toy, make_toy

from keyturn.testing.secret_scan import assert_no_secrets

DAY = 86400.0
HOUR = 3600.0
#: Schedule seconds per real second: the 10 days pass in 18 s.
SCALE = 48000.0
#: The wait's check interval (schedule seconds; 0.6 s real): the tolerance of each offset.
CHECK = 8 * HOUR
HOOK_KEY = "toy-remind-hook-key-" + "5e" * 12

PERSON = f"""
[schedule]
test_clock = true

[notifications]
poll_seconds = 0.05
holder_lost_after_seconds = 600

[notifications.sinks.users]
type = "http"
url = "{{url}}/users"
secret_env = "TOY_HOOK_KEY"
events = ["user_task", "reminder"]

[notifications.sinks.owner]
type = "http"
url = "{{url}}/owner"
secret_env = "TOY_HOOK_KEY"
events = ["escalated"]

[credentials.toy1.person]
name = "alice"
due_seconds = {10 * DAY}
remind_before = [{7 * DAY}, {DAY}]
remind_every = {DAY}
snoozes = 2
snooze_seconds = {8 * HOUR}
snooze_file = "{{work}}/snoozes.txt"
acted_file = "{{work}}/acted"
escalate = true
on_due = "report"
check_seconds = {CHECK}
"""


@dataclass
class Got:
    path: str
    notification_id: str
    body: dict[str, Any]


@dataclass
class Receiver:
    url: str = ""
    got: list[Got] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, path: str, kind: str | None = None) -> list[Got]:
        with self.lock:
            return [g for g in self.got if g.path == path and kind in (None, g.body["kind"])]

    def distinct(self, path: str, kind: str) -> list[Got]:
        """One per notification (a delivery re-sent after a kill has the same id)."""
        seen: dict[str, Got] = {}
        for g in self.of(path, kind):
            seen.setdefault(g.notification_id, g)
        return list(seen.values())


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with rec.lock:
                rec.got.append(
                    Got(
                        self.path,
                        str(self.headers.get("Keyturn-Notification-Id")),
                        json.loads(body),
                    )
                )
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    rec.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()


def until(what: str, check: Callable[[], object], seconds: float = 40.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def env(toy: Toy) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")}
    full["KEYTURN_CONFIG"] = str(toy.workdir / "keyturn.toml")
    full["TOY_HOOK_KEY"] = HOOK_KEY
    return full


def start_worker(toy: Toy, n: int) -> subprocess.Popen[bytes]:
    logs = toy.workdir / "logs"
    logs.mkdir(exist_ok=True)
    return subprocess.Popen(
        [*KEYTURN, "worker", "--concurrency", "2"],
        cwd=toy.workdir,
        env=env(toy),
        stdout=(logs / f"worker{n}.out").open("wb"),
        stderr=(logs / f"worker{n}.err").open("wb"),
    )


def at(g: Got) -> datetime:
    return datetime.fromisoformat(g.body["at"])


def test_reminders_snoozes_and_escalation_on_the_test_clock(
    tmp_path: Path, receiver: Receiver
) -> None:
    toy = make_toy(tmp_path / "work")
    work = toy.workdir
    with (work / "keyturn.toml").open("a") as f:
        f.write(PERSON.replace("{url}", receiver.url).replace("{work}", str(work)))
    start = datetime.now(UTC).replace(microsecond=0)
    toy.run("clock", "set", "--at", start.isoformat(), "--scale", f"{SCALE:g}")
    rid = toy.rotate_here()
    worker = start_worker(toy, 1)
    try:
        until("the invitation", lambda: receiver.of("/users", "user_task"))
        invite = receiver.of("/users", "user_task")[0].body
        link = invite["link"]
        assert invite["to"] == "alice" and link.startswith("https://toy.example/task/")
        assert invite["link_ref"] and invite["rotation_id"] == rid and not invite["opens"]
        due = datetime.fromisoformat(invite["due"])
        # the invitation is due 10 days after it was sent, on the schedule's clock
        assert abs((due - at(receiver.of("/users", "user_task")[0])).total_seconds() - 10 * DAY) < (
            CHECK
        )

        until("reminder 1", lambda: receiver.distinct("/users", "reminder"))
        first = receiver.distinct("/users", "reminder")[0]
        assert first.body["detail"]["reminder"] == 1 and first.body["to"] == "alice"
        assert first.body["link"] == link and first.body["due"] == invite["due"]
        late = (at(first) - (due - timedelta(days=7))).total_seconds()
        assert 0 <= late <= CHECK, f"reminder 1 {late:.0f} s after its offset"

        # the person snoozes three times (two count), and the worker is killed and restarted
        (work / "snoozes.txt").write_text("3")
        time.sleep(0.3)  # its delivery recorded (a delivery re-sent would keep its id)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        worker = start_worker(toy, 2)

        until("reminder 2", lambda: len(receiver.distinct("/users", "reminder")) >= 2)
        second = receiver.distinct("/users", "reminder")[1]
        assert second.body["detail"]["reminder"] == 2
        # 1 day before, postponed by two snoozes of 8 hours (the third does not count)
        expected = due - timedelta(days=1) + timedelta(hours=16)
        late = (at(second) - expected).total_seconds()
        assert 0 <= late <= CHECK, f"reminder 2 {late:.0f} s after its offset"
        assert second.body["detail"]["snoozed"] == 2

        until("the escalation", lambda: receiver.distinct("/owner", "escalated"))
        escalated = receiver.distinct("/owner", "escalated")[0]
        late = (at(escalated) - due).total_seconds()
        assert 0 <= late <= CHECK, f"the escalation {late:.0f} s after the deadline"
        assert escalated.body["to"] == "alice" and escalated.body["link"] == link
        # the owner's sink gets no reminder, the users' no escalation
        assert not receiver.of("/owner", "reminder") and not receiver.of("/users", "escalated")

        time.sleep(3 * CHECK / SCALE + 0.5)  # a few more checks past the deadline
        listed = json.loads(toy.run("rotations", "list", "--attention", "--json").stdout)
        mine = [r for r in listed if r["id"] == rid]
        assert mine, listed
        words = f"overdue: alice did not act by {due.isoformat(timespec='seconds')}"
        assert mine[0]["attention"] == words, mine[0]
        left = toy.wiring().store.get_rotation(rid)
        assert left.state.value == "verified" and left.halted_reason is None
        assert left.wait_key == "forward.person:overdue"
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(5)

    # never twice: the events and what the sinks received agree
    reminders = receiver.distinct("/users", "reminder")
    assert [g.body["detail"]["reminder"] for g in reminders] == [1, 2]
    assert len(receiver.distinct("/owner", "escalated")) == 1
    assert len(receiver.distinct("/users", "user_task")) == 1
    events = toy.wiring().store.events(rid)
    statuses = [e.detail.get("status") for e in events if e.kind == "run"]
    assert statuses.count("reminder") == 2 and statuses.count("escalated") == 1
    assert statuses.count("user_task") == 1
    # a person who never acts keeps the old key
    assert toy.ledger["k0"]["active"] is True
    # the link is in what the sink received only
    token = link.rsplit("/", 1)[1]
    assert_no_secrets([work], {"link": link, "link token": token})


HALTING = f"""
[credentials.toy1.person]
name = "bob"
due_seconds = {2 * DAY}
remind_before = [{DAY}]
acted_file = "acted"
on_due = "halt"
check_seconds = {6 * HOUR}
"""


class ManualClock:
    def __init__(self) -> None:
        self.at = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.at


def test_on_due_halt_escalates_once_and_halts_for_a_human(tmp_path: Path) -> None:
    """In one process on a manual clock: one reminder a day before, then at the deadline one
    escalation and a halt with the reason; the old key is still active."""
    import asyncio

    from keyturn.domain.model import OperatorAction
    from keyturn.engine.operator import record_request
    from keyturn.engine.registry import discovered
    from keyturn.engine.worker import Worker

    toy = make_toy(tmp_path / "work")
    with (toy.workdir / "keyturn.toml").open("a") as f:
        f.write(HALTING)
    w = toy.wiring()
    clock = ManualClock()
    w.clock = clock
    store = w.store

    async def scenario() -> None:
        worker = Worker(w.engine_deps(1), concurrency=1)
        running = asyncio.create_task(worker.run())

        async def wait_for(what: str, check: Callable[[], bool]) -> None:
            deadline = time.monotonic() + 20
            while not check():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.02)

        def statuses() -> list[object]:
            return [e.detail.get("status") for e in store.events(rid) if e.kind == "run"]

        try:
            rid = w.start_rotation("toy1", reason="remind test", actor="test").id
            await wait_for("the wait", lambda: store.get_rotation(rid).wait_key is not None)
            assert store.get_rotation(rid).wait_key == "forward.person:person"
            assert statuses().count("user_task") == 1
            for _ in range(8):  # six-hour checks over two days
                version = store.get_rotation(rid).version
                clock.at += timedelta(hours=6, seconds=1)
                await wait_for(
                    "a check",
                    lambda v=version: (
                        store.get_rotation(rid).version > v
                        and store.get_rotation(rid).lease_owner is None
                    ),
                )
            await wait_for("the halt", lambda: store.get_rotation(rid).halted_reason is not None)
            halted = store.get_rotation(rid)
            # an operator resumes anyway: the deadline is found passed again, the rotation
            # halts again, and the owner is not escalated to a second time for it
            record_request(store, discovered(), clock, rid, OperatorAction.RESUME, "oncall", "x")
            await wait_for(
                "the halt after the resume",
                lambda: (
                    store.get_rotation(rid).request is None
                    and store.get_rotation(rid).halted_reason is not None
                    and store.get_rotation(rid).lease_owner is None
                ),
            )
        finally:
            worker.stop()
            await running
        assert statuses().count("reminder") == 1
        assert statuses().count("escalated") == 1
        reason = halted.halted_reason or ""
        assert "bob did not act by" in reason
        assert "keyturn cannot act for them" in reason
        # the advice says what a resume does, and names a verb that applies (not "resume")
        assert "Only bob can act, and their deadline has passed: resuming halts again" in reason
        assert "rotations resume" not in reason
        assert f"keyturn rotations cancel {rid}" not in reason  # the invitation was sent
        assert f"roll it back with `keyturn rotations rollback {rid}" in reason
        again = store.get_rotation(rid).halted_reason or ""
        assert again != reason and "resuming halts again" in again  # the wait began again

    asyncio.run(scenario())
    assert toy.ledger["k0"]["active"] is True


ACTED = f"""
[credentials.toy1.person]
name = "carol"
due_seconds = {DAY}
acted_file = "{{work}}/acted"
"""


@pytest.mark.parametrize(
    "point",
    [f"forward.invite_person.{b}" for b in ("after_intent", "after_call", "after_outcome")],
)
def test_the_invitation_is_notified_once_whatever_the_kill(tmp_path: Path, point: str) -> None:
    """A worker killed around the invitation's action: one user_task event and one outbox
    notification (written with the action's outcome), and the rotation goes on."""
    toy = make_toy(tmp_path / "work")
    with (toy.workdir / "keyturn.toml").open("a") as f:
        f.write(ACTED.replace("{work}", str(toy.workdir)))
    (toy.workdir / "acted").write_text("yes")  # the person acts at once
    rid = toy.rotate_here()
    marker = tmp_path / "killed-at"
    killed = toy.run(
        "worker",
        "--until-idle",
        check=False,
        KEYTURN_TEST_CRASH_AT=point,
        KEYTURN_TEST_CRASH_MARKER=str(marker),
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert marker.read_text().split() == [point]
    toy.run("worker", "--until-idle")
    store = toy.wiring().store
    assert store.get_rotation(rid).state.value == "old_deactivated"
    tasks = [e for e in store.events(rid) if e.detail.get("status") == "user_task"]
    assert len(tasks) == 1 and tasks[0].detail["to"] == "carol"
    assert tasks[0].detail["link_ref"]
    from sqlalchemy import select

    from keyturn.adapters.store.models import notifications_t

    with store.engine.connect() as conn:
        kinds = [row.kind for row in conn.execute(select(notifications_t))]
    assert kinds.count("user_task") == 1, kinds
