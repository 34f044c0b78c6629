"""What every kind shares: running one step with its provider session, and the rule that makes
a rotation irreversible."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from keyturn.domain.errors import KeyturnError
from keyturn.domain.lifecycle import Trigger
from keyturn.domain.model import ActionRecord, Phase
from keyturn.engine.run import RotationRun


class Session(Protocol):
    async def aclose(self) -> None: ...


S = TypeVar("S", bound=Session)


async def dispatch(
    run: RotationRun,
    trigger: Trigger,
    session: S,
    steps: Mapping[Trigger, Callable[[RotationRun, S], Awaitable[None]]],
) -> None:
    """Run the step for `trigger` with the provider `session`, and always close the session."""
    try:
        step = steps.get(trigger)
        if step is None:  # the graph has no other worker-driven trigger
            raise KeyturnError(f"no step for trigger {trigger}")
        await step(run, session)
    finally:
        await session.aclose()


def irreversible_reason(
    declared: frozenset[tuple[Phase, str]], actions: Sequence[ActionRecord]
) -> str | None:
    """Irreversible from the first recorded intent of a declared action."""
    for a in actions:
        if (a.phase, a.name) in declared:
            return (
                f"it is irreversible from action {a.name} on (intent recorded "
                f"{a.intent_at.isoformat(timespec='seconds')})"
            )
    return None
