"""Provider faults drawn per HTTP request while two workers run 100 rotations with the default
retry policy: every rotation finishes exactly once, with no duplicate or orphaned credential."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fleet import RotationRow, make_fleet

from keyturn.sandbox.testing import SandboxProcess

FAULTS = {
    "error_rate": 0.10,
    "rate_429": 0.05,
    "hang_rate": 0.02,
    "hang_seconds": 3,
    "apply_then_fail_rate": 0.05,
}
#: Switch the apply-then-fail mode ("500" <-> "drop") after each injection in the current mode,
#: so that both modes happen as soon as two injections did (the sandbox has one mode at a time
#: and one counter for both; about ten injections are expected in a run).
SWITCH_AFTER = 1


class ModeSwitcher:
    """Alternates apply_then_fail_mode and attributes the sandbox's one counter to each mode."""

    def __init__(self, sandbox: SandboxProcess) -> None:
        self.sandbox = sandbox
        self.mode = "drop"
        self.at_switch = 0
        self.by_mode = {"500": 0, "drop": 0}

    def poll(self, _rows: dict[str, RotationRow]) -> None:
        total = int(self.sandbox.state()["faults"]["apply_then_fail"])
        in_mode = total - self.at_switch
        if in_mode >= SWITCH_AFTER:
            self.by_mode[self.mode] += in_mode
            self.at_switch = total
            self.mode = "drop" if self.mode == "500" else "500"
            self.sandbox.set_faults(apply_then_fail_mode=self.mode)

    def finish(self, total: int) -> dict[str, int]:
        self.by_mode[self.mode] += total - self.at_switch
        self.at_switch = total
        return self.by_mode


def test_hundred_rotations_under_provider_faults(tmp_path: Path) -> None:
    started = time.monotonic()
    # the client gives up on a request after 2 s (a 3 s hang is a timeout); the [worker] retry
    # policy (max_attempts, backoff) stays what `keyturn init` writes
    fleet = make_fleet(tmp_path, 100, timeout_seconds=2, worker={"poll_seconds": 0.2})
    try:
        ids = fleet.start_rotations()
        assert len(ids) == 100
        switcher = ModeSwitcher(fleet.sandbox)
        fleet.sandbox.set_faults(**FAULTS, apply_then_fail_mode=switcher.mode)
        workers = [fleet.start_worker(concurrency=16) for _ in range(2)]
        rows = fleet.wait_settled(timeout=240, every=0.25, on_poll=switcher.poll)
        fleet.sandbox.clear_faults()
        codes = fleet.stop_workers()
        faults = fleet.sandbox.state()["faults"]
        by_mode = switcher.finish(int(faults["apply_then_fail"]))
        elapsed = time.monotonic() - started

        fleet.assert_all_done(rows)
        fleet.assert_transitions_once()
        fleet.check_provider(rows)  # exactly 2 credentials per account: zero duplicates
        assert codes == {w.name: 0 for w in workers}, [w.tail() for w in workers]

        reconciled = fleet.reconcile()
        assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
        assert json.loads(reconciled.stdout) == []

        # every kind of fault really happened during the run
        assert faults["error_500"] > 0, faults
        assert faults["rate_429"] > 0, faults
        assert faults["hang"] > 0, faults
        assert by_mode["500"] > 0 and by_mode["drop"] > 0, (faults, by_mode)
        failed_steps = [e for e in fleet.reader.events() if e.kind == "run"]
        # every change that was applied and then reported as failed (or dropped) was found at
        # the provider and adopted afterwards, rather than made a second time
        adopted = [a for a in fleet.reader.actions() if a[4].get("reconciled") is True]
        assert len(adopted) == faults["apply_then_fail"], (adopted, faults)
        print(
            f"\n100 rotations under faults: {elapsed:.1f}s; injected {faults}; "
            f"apply-then-fail by mode {by_mode}; {len(failed_steps)} failed step attempts retried; "
            f"{len(adopted)} outcomes adopted after an unknown outcome"
        )
    finally:
        fleet.kill_workers()
        fleet.sandbox.stop()
