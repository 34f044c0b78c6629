"""A wait of 10 minutes on a test clock, one worker at concurrency 1: other rotations keep
moving, the waiting rotation holds no lease between its checks, its attempts stay at 0, and at
its deadline it halts with the reason. Real SQLite, the real Worker, the toy plugin."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from keyturn_toy import BAKED, fingerprint

from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.vault import new_master_key
from keyturn.cli.setup import ImportEntry, import_credential
from keyturn.cli.wiring import Wiring
from keyturn.config import load_config
from keyturn.domain.model import Event, Rotation
from keyturn.engine.worker import Worker

CONFIG = """\
[database]
url = "sqlite:///keyturn.db"

[keys]
master_key_file = "master.key"

[worker]
poll_seconds = 0.05

[providers.none]
base_url = "http://127.0.0.1:9"
"""

TOY = """
[credentials.{name}]
kind = "toy"
provider = "none"
ledger = "{name}.json"
bake_seconds = {bake}
bake_deadline_seconds = 600

[[credentials.{name}.targets]]
type = "toy_file"
path = "deploy/{name}.secret"
"""


class ManualClock:
    def __init__(self) -> None:
        self.at = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


def setup(workdir: Path) -> Wiring:
    workdir.mkdir()
    key = workdir / "master.key"
    key.write_text(new_master_key() + "\n")
    key.chmod(0o600)
    names = {"slow": 3600, "quick1": 0, "quick2": 0, "quick3": 0}
    text = CONFIG + "".join(TOY.format(name=n, bake=b) for n, b in names.items())
    (workdir / "keyturn.toml").write_text(text)
    config = load_config(workdir / "keyturn.toml")
    upgrade(config.database.url)
    w = Wiring(config)
    for name in names:
        first = secrets.token_bytes(32)
        (workdir / f"{name}.first").write_bytes(first)
        ledger = {"k0": {"fingerprint": fingerprint(first), "active": True}}
        (workdir / f"{name}.json").write_text(json.dumps(ledger))
        import_credential(
            w,
            ImportEntry(
                name=name,
                kind="toy",
                provider="none",
                material_file=workdir / f"{name}.first",
                material_option="--secret-file",
                credential_id="k0",
                credential_uuid=None,
                token_file=None,
            ),
        )
    return w


async def until(what: str, check: object) -> None:
    deadline = time.monotonic() + 30.0
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_a_ten_minute_wait_holds_no_lease_spends_no_attempt_and_halts_at_its_deadline(
    tmp_path: Path,
) -> None:
    w = setup(tmp_path / "work")
    clock = ManualClock()
    w.clock = clock  # type: ignore[assignment]
    store = w.store

    async def scenario() -> None:
        worker = Worker(w.engine_deps(1), concurrency=1)
        running = asyncio.create_task(worker.run())
        try:
            slow = w.start_rotation("slow", reason="wait test", actor="test").id

            def get(rid: str) -> Rotation:
                return store.get_rotation(rid)

            await until("the slow rotation to wait", lambda: get(slow).wait_for is not None)
            waiting = get(slow)
            assert waiting.state.value == "new_added"
            assert waiting.wait_key == "forward.bake"
            assert waiting.wait_for == "the new key to bake on its targets for 3600s"
            assert waiting.wait_deadline == waiting.wait_since + timedelta(seconds=600)
            assert waiting.attempts == 0

            # The one slot is free while it waits: three other rotations run to the end.
            quick = [
                w.start_rotation(n, reason="wait test", actor="test").id
                for n in ("quick1", "quick2", "quick3")
            ]
            await until(
                "the other rotations to finish",
                lambda: all(get(r).state.value == "old_deactivated" for r in quick),
            )
            assert get(slow).lease_owner is None

            # Nine checks over nine minutes: each claims, checks, releases; none is an attempt.
            for _ in range(9):
                before = get(slow).version
                clock.advance(60)
                await until(
                    "a check",
                    lambda b=before: get(slow).version >= b + 2 and get(slow).lease_owner is None,
                )
                checked = get(slow)
                assert checked.attempts == 0 and checked.halted_reason is None
                assert checked.state.value == "new_added" and checked.wait_key == "forward.bake"

            clock.advance(61)  # past the deadline
            await until("the halt", lambda: get(slow).halted_reason is not None)
            halted = get(slow)
            assert halted.attempts == 0
            assert halted.lease_owner is None
            assert "waited for the new key to bake on its targets for 3600s since" in (
                halted.halted_reason or ""
            )
            # waits run on the schedule's clock (the database's, offset from this test's
            # clock when the worker synced): the deadline is ten minutes after the wait began
            found = re.search(r"since (\S+); its deadline (\S+) passed", halted.halted_reason or "")
            assert found, halted.halted_reason
            since, deadline = (datetime.fromisoformat(g) for g in found.groups())
            assert deadline - since == timedelta(seconds=600)
            assert f"keyturn rotations resume {slow}" in (halted.halted_reason or "")
            events = [e for e in store.events(slow) if e.detail.get("status") == "waiting"]
            assert len(events) == 1  # the wait began once; its checks add no event
        finally:
            worker.stop()
            await running

    asyncio.run(scenario())


def test_evidence_recorded_while_a_worker_holds_the_rotation_is_not_lost(tmp_path: Path) -> None:
    """A person's page records evidence just after the worker's step read it, while the worker
    still holds the lease (so it does not make the rotation due); the worker then writes the
    wait with its next check a minute later. Looked at again after the release, the rotation is
    due at once: with the test clock standing still it finishes, instead of waiting a minute
    (the race a 200-user passkey campaign met: a user's proof came 80 ms after the check)."""
    w = setup(tmp_path / "work")
    clock = ManualClock()
    w.clock = clock  # type: ignore[assignment]
    store = w.store
    read = store.evidence
    late: list[str] = []

    def evidence_then_a_page_writes(rotation_id: str) -> dict[str, Event]:
        found = read(rotation_id)
        if not late:  # the first read of the bake: the page writes right after it
            late.append(rotation_id)
            assert store.get_rotation(rotation_id).lease_owner is not None
            page = Event(rotation_id, clock.now(), "evidence", "user:someone", trigger=BAKED)
            assert store.add_evidence(page)
        return found

    store.evidence = evidence_then_a_page_writes  # type: ignore[method-assign]

    async def scenario() -> None:
        worker = Worker(w.engine_deps(1), concurrency=1)
        running = asyncio.create_task(worker.run())
        try:
            slow = w.start_rotation("slow", reason="wait test", actor="test").id
            await until(
                "the bake to end on the late evidence, the clock standing still",
                lambda: store.get_rotation(slow).state.value == "old_deactivated",
            )
            assert late == [slow]
            waits = [e for e in store.events(slow) if e.detail.get("status") == "waiting"]
            assert len(waits) == 1  # it did wait (the evidence came after the check)
        finally:
            worker.stop()
            await running

    asyncio.run(scenario())
