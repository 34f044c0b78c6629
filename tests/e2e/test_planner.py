"""The planner against what the worker then does, request for request at the sandbox: for the
service-account, PAT and webhook kinds, the plan of the forward path from pending, and of a
rollback from each state it is allowed from, equals the sandbox's request log of the run.

A rotation is driven to its starting state step by step in this process (not measured); the
measured part is a real Worker over HTTP, a real SQLite store and the real receiver."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from harness import PAT, SA, WEBHOOK, Kt, collapse, requests_since

from keyturn.cli.wiring import Wiring
from keyturn.config import load_config
from keyturn.domain.lifecycle import FORWARD, State
from keyturn.domain.model import OperatorAction
from keyturn.engine.operator import request_action
from keyturn.engine.planner import plan, provider_requests
from keyturn.engine.run import EngineDeps, RotationRun
from keyturn.engine.steps import Waiting, run_step
from keyturn.engine.worker import Worker

ORDER = [State.PENDING, State.NEW_ADDED, State.VERIFIED, State.OLD_DEACTIVATED]


async def drive_to(deps: EngineDeps, rid: str, state: State) -> None:
    """Step the rotation forward in this process until it reaches `state` (waits retried)."""
    deadline = time.monotonic() + 60
    while (rotation := deps.store.get_rotation(rid)).state is not state:
        assert time.monotonic() < deadline, f"{rid} did not reach {state}"
        run = RotationRun(deps, rotation, "planner-test")
        await run.renew()
        try:
            await run_step(run, FORWARD[rotation.state])
        except Waiting:
            await asyncio.sleep(0.2)
        await run.release()


def check_plan_against_run(kt: Kt, w: Wiring, name: str, start: State | None) -> None:
    """`start` None: the forward path from pending; else a rollback from `start`."""
    deps = w.engine_deps(2)
    rid = w.start_rotation(name, reason="planner test", actor="test").id

    async def scenario() -> None:
        if start is not None:
            await drive_to(deps, rid, start)
        rotation = deps.store.get_rotation(rid)
        planned = plan(
            deps.registry,
            rotation,
            deps.store.actions(rid),
            targets=[t.name for t in deps.targets(name)],
            probes=[p.name for p in deps.probes(name)],
            rollback=start is not None,
        )
        expected = provider_requests(planned)
        polled = {route for route, repeat in expected if repeat}
        seq, _ = requests_since(kt, 0)
        if start is not None:
            _, applied = await request_action(deps, rid, OperatorAction.ROLLBACK, "t", "plan")
            assert applied is not None and applied.outcome == "applied", applied
        await Worker(deps, concurrency=1).run(until_idle=True)
        _, log = requests_since(kt, seq)
        assert all(r["status"] < 300 for r in log), log
        done = deps.store.get_rotation(rid)
        assert done.state is (State.OLD_DEACTIVATED if start is None else State.ROLLED_BACK)
        actual = collapse([r["route"] for r in log], polled)
        assert actual == collapse([route for route, _ in expected], polled), (
            f"{name} from {start or 'pending'}: plan and run differ"
        )

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("name", "receiver", "rollback_from"),
    [
        (SA, False, ORDER[1:]),
        (PAT, False, ORDER[1:]),
        # A webhook's old_deactivated is irreversible: rollback is refused there (tested
        # elsewhere); the plan covers the states it is allowed from.
        (WEBHOOK, True, ORDER[1:3]),
    ],
)
def test_plans_equal_what_the_worker_does(
    make_kt: Callable[..., Kt], name: str, receiver: bool, rollback_from: list[State]
) -> None:
    kt = make_kt(receiver=receiver)
    w = Wiring(load_config(kt.config))
    check_plan_against_run(kt, w, name, None)
    for state in rollback_from:
        check_plan_against_run(kt, w, name, state)
