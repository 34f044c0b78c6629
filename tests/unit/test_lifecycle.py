"""The lifecycle graph: legal edges, typed refusals, guards."""

from __future__ import annotations

import pytest

from keyturn.domain.errors import IllegalTransition, TransitionRefused
from keyturn.domain.lifecycle import (
    EDGES,
    FINAL_STATES,
    GuardFacts,
    State,
    Trigger,
    allowed_triggers,
    check_guards,
    fire,
)


def test_forward_path() -> None:
    s = State.PENDING
    for t in (Trigger.ADD_NEW, Trigger.VERIFY, Trigger.DEACTIVATE_OLD):
        s = fire(s, t)
    assert s is State.OLD_DEACTIVATED


def test_illegal_trigger_names_state_and_allowed() -> None:
    with pytest.raises(IllegalTransition) as info:
        fire(State.NEW_ADDED, Trigger.DEACTIVATE_OLD)
    err = info.value
    assert err.state == "new_added" and err.trigger == "deactivate_old"
    assert err.allowed == ["rollback", "verify"]
    assert "new_added" in str(err) and "rollback, verify" in str(err)


def test_unknown_trigger_is_illegal_not_a_crash() -> None:
    with pytest.raises(IllegalTransition):
        fire(State.PENDING, "explode")


def test_final_states_allow_nothing_but_rollback_of_done() -> None:
    assert allowed_triggers(State.ROLLED_BACK) == []
    assert allowed_triggers(State.CANCELLED) == []
    assert allowed_triggers(State.OLD_DEACTIVATED) == ["rollback"]
    assert {State.OLD_DEACTIVATED, State.ROLLED_BACK, State.CANCELLED} == FINAL_STATES


def test_every_edge_is_reachable_in_the_machine() -> None:
    for e in EDGES:
        assert fire(e.source, e.trigger) is e.dest


def test_cancel_refused_once_an_intent_exists() -> None:
    assert check_guards(State.PENDING, Trigger.CANCEL, GuardFacts()) is State.CANCELLED
    with pytest.raises(TransitionRefused, match="use rollback"):
        check_guards(State.PENDING, Trigger.CANCEL, GuardFacts(any_intent=True))


def test_rollback_of_untouched_pending_says_cancel() -> None:
    with pytest.raises(TransitionRefused, match="use cancel"):
        check_guards(State.PENDING, Trigger.ROLLBACK, GuardFacts(any_intent=False))
    assert (
        check_guards(State.PENDING, Trigger.ROLLBACK, GuardFacts(any_intent=True))
        is State.ROLLING_BACK
    )


def test_rollback_of_done_rotation_needs_latest_and_retained_key() -> None:
    ok = GuardFacts(any_intent=True)
    assert check_guards(State.OLD_DEACTIVATED, Trigger.ROLLBACK, ok) is State.ROLLING_BACK
    with pytest.raises(TransitionRefused, match="newer rotation"):
        check_guards(
            State.OLD_DEACTIVATED, Trigger.ROLLBACK, GuardFacts(any_intent=True, is_latest=False)
        )
    with pytest.raises(TransitionRefused, match="purged"):
        check_guards(
            State.OLD_DEACTIVATED,
            Trigger.ROLLBACK,
            GuardFacts(any_intent=True, old_key_retained=False),
        )


def test_irreversible_reason_refuses_rollback_with_that_reason() -> None:
    facts = GuardFacts(any_intent=True, irreversible_reason="the old webhook is being deleted")
    with pytest.raises(TransitionRefused, match="old webhook is being deleted"):
        check_guards(State.VERIFIED, Trigger.ROLLBACK, facts)


@pytest.mark.parametrize(
    "status, retry",
    [
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (409, False),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
    ],
)
def test_status_classification(status: int, retry: bool) -> None:
    from keyturn.domain.retry import retryable_status

    assert retryable_status(status) is retry


def test_backoff_grows_with_jitter_and_is_bounded() -> None:
    import random

    from keyturn.domain.retry import RetryPolicy

    policy = RetryPolicy(max_attempts=4, base_seconds=1.0, max_seconds=5.0)
    rng = random.Random(7)
    delays = [policy.delay(n, rng) for n in range(1, 8)]
    assert all(
        0.1 * min(5.0, 2 ** (n - 1)) <= d <= min(5.0, 2 ** (n - 1)) for n, d in enumerate(delays, 1)
    )
    assert max(delays) <= 5.0
    assert not policy.exhausted(3) and policy.exhausted(4)
