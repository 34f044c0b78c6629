"""The action log of one rotation: intent before effect for every call to the outside world.

1. Record the intent (rotation, step, action, idempotency key) and commit, before the call.
2. Make the call.
3. Record the outcome (ids, fingerprints, never secret material).

An action already done returns its recorded outcome. An action whose intent exists without an
outcome (a crash, a timeout, a 5xx) is reconciled first: what the provider reports is adopted
instead of acting twice.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from keyturn.domain.errors import KeyturnError, StaleVersion, StoreUnavailable
from keyturn.domain.model import ActionRecord, ActionStatus, Event, Phase, evolve
from keyturn.engine.lease import LeaseLost
from keyturn.engine.spi import USER_TASK, Outcome

if TYPE_CHECKING:
    from keyturn.engine.run import RotationRun

Detail = dict[str, Any]


class ActionLog:
    def __init__(self, run: RotationRun) -> None:
        self._run = run
        self._records: dict[tuple[Phase, str], ActionRecord] | None = None

    async def records(self) -> dict[tuple[Phase, str], ActionRecord]:
        if self._records is None:
            run = self._run
            found = await run.loaders.actions.load(run.rotation.id) or []
            self._records = {(a.phase, a.name): a for a in found}
        return self._records

    async def get(self, phase: Phase, name: str) -> ActionRecord | None:
        return (await self.records()).get((phase, name))

    async def perform(
        self,
        phase: Phase,
        name: str,
        call: Callable[[], Awaitable[Detail | Outcome]],
        reconcile: Callable[[], Awaitable[Detail | None]] | None = None,
        intent: Callable[[], Mapping[str, Any]] | None = None,
        prepare: Callable[[], Awaitable[None]] | None = None,
    ) -> Detail:
        """Run one action with intent before effect; its outcome's detail."""
        from keyturn.engine.run import OperatorInterrupt

        run = self._run
        records = await self.records()
        record = records.get((phase, name))
        if record is not None and record.status is ActionStatus.DONE:
            return dict(record.detail)
        boundary = f"{phase.value}.{name}"
        if prepare is not None:
            await prepare()
        run.deps.crash_hook(f"{boundary}.before_intent")
        await run.boundary()
        bound = run.log.bind(step=phase.value, action=name)
        started = time.monotonic()
        if record is not None and reconcile is not None:
            adopted = await reconcile()
            if adopted is not None:
                await self._outcome(
                    record,
                    ActionStatus.DONE,
                    {**adopted, "reconciled": True},
                    hook=f"{boundary}.after_outcome",
                )
                bound.info(
                    "action", outcome="adopted", duration_ms=_ms(started), after="unknown outcome"
                )
                return adopted
        record = ActionRecord(
            rotation_id=run.rotation.id,
            phase=phase,
            name=name,
            idempotency_key=record.idempotency_key
            if record
            else f"{run.rotation.id}:{phase}:{name}",
            status=ActionStatus.INTENT,
            intent_at=run.now(),
            attempts=(record.attempts + 1) if record else 1,
            detail=dict(intent() if intent is not None else {}),
        )
        await run.unit.add(action=record, updates=run.lease.updates(run.now()))
        records[(phase, name)] = record
        run.deps.crash_hook(f"{boundary}.after_intent")
        if run.rotation.request is not None:  # the intent commit returned the current row
            raise OperatorInterrupt()
        try:
            result = await call()
        except (LeaseLost, StaleVersion, StoreUnavailable):
            raise  # not ours to record any more (or not recordable now)
        except KeyturnError as exc:
            unknown = bool(getattr(exc, "outcome_unknown", False))
            bound.warning(
                "action",
                outcome="error",
                duration_ms=_ms(started),
                error=str(exc),
                retryable=bool(getattr(exc, "retryable", False)),
                outcome_unknown=unknown,
            )
            if not unknown:  # known not applied: say so; an unknown outcome keeps its intent
                await self._outcome(record, ActionStatus.FAILED, dict(record.detail), str(exc))
            raise
        run.deps.crash_hook(f"{boundary}.after_call")
        outcome = result if isinstance(result, Outcome) else Outcome(result)
        await self._outcome(
            record,
            ActionStatus.DONE,
            outcome.detail,
            outcome=outcome,
            hook=f"{boundary}.after_outcome",
        )
        bound.info("action", outcome="done", duration_ms=_ms(started))
        return outcome.detail

    async def _outcome(
        self,
        record: ActionRecord,
        status: ActionStatus,
        detail: Detail,
        error: str | None = None,
        outcome: Outcome | None = None,
        hook: str | None = None,
    ) -> None:
        run = self._run
        done = evolve(
            record, {"status": status, "outcome_at": run.now(), "detail": detail, "error": error}
        )
        events = [self._user_task(record, detail)] if _asks_user_task(status, detail) else []
        await run.unit.add(
            action=done, secrets=outcome.secrets if outcome else (), hook=hook, events=events
        )
        (await self.records())[(record.phase, record.name)] = done

    def _user_task(self, record: ActionRecord, detail: Detail) -> Event:
        """The event of an outcome that asks for the person's invitation (see
        :func:`keyturn.engine.spi.user_task`): written with the outcome, so exactly once."""
        run = self._run
        return Event(
            rotation_id=run.rotation.id,
            at=run.now(),
            kind="run",
            actor=run.owner,
            trigger=record.phase.value,
            from_state=run.rotation.state.value,
            reason=f"asked {detail.get('to')} to act by {detail.get('due')}",
            detail={
                "status": USER_TASK,
                "action": f"{record.phase.value}.{record.name}",
                "to": detail.get("to"),
                "due": detail.get("due"),
                "link_ref": detail.get("link_ref"),
                "at": run.deps.time.now().isoformat(),
                # what the person is asked to do, in the kind's word (the notice keeps it)
                **({"task": str(detail["task"])} if detail.get("task") else {}),
            },
        )


def _asks_user_task(status: ActionStatus, detail: Detail) -> bool:
    return status is ActionStatus.DONE and detail.get("notify") == USER_TASK


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
