"""A process's own metrics (keyturn.adapters.metrics) and the fleet's definitions
(keyturn.engine.fleet), without a database: the classes of requests and errors, the labelled
children made once, the worker's step attempts counted by result, and since when a rotation
has needed attention."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from keyturn.adapters.metrics import ProcessMetrics, error_class, request_outcome
from keyturn.domain.errors import KeyturnError
from keyturn.domain.lifecycle import State, Trigger
from keyturn.domain.model import OperatorAction, OperatorRequest, Rotation
from keyturn.engine.fleet import attention_since, group_status
from keyturn.engine.steps import Waiting
from keyturn.engine.worker import Worker
from keyturn.ports import RotationGroup

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _values(metrics: ProcessMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("keyturn_")
    }


def test_requests_are_counted_by_outcome_and_failures_by_class() -> None:
    assert [request_outcome(s) for s in (200, 204, 302, 404, 429, 503, "timeout", "connection")] \
        == ["2xx", "2xx", "3xx", "4xx", "4xx", "5xx", "timeout", "connection"]  # fmt: skip
    assert [error_class(s) for s in (200, 202, 404, 429, 500, "timeout", "connection")] == [
        None, None, "client_error", "rate_limited", "server_error", "timeout", "connection",
    ]  # fmt: skip
    m = ProcessMetrics()
    observe = m.observer("dfns")
    assert m.observer("dfns") is observe
    for status in (200, 201, 429, 500, "timeout"):
        observe("POST", status)
    observe("GET", 200)
    v = _values(m)
    req = "keyturn_provider_requests_total"
    assert v[(req, (("method", "POST"), ("outcome", "2xx"), ("provider", "dfns")))] == 2
    assert v[(req, (("method", "GET"), ("outcome", "2xx"), ("provider", "dfns")))] == 1
    assert v[(req, (("method", "POST"), ("outcome", "timeout"), ("provider", "dfns")))] == 1
    errors = {dict(ls)["class"]: n for (name, ls), n in v.items()
              if name == "keyturn_provider_errors_total"}  # fmt: skip
    assert errors == {"rate_limited": 1, "server_error": 1, "timeout": 1}


def test_steps_are_counted_by_result_and_timed() -> None:
    m = ProcessMetrics()
    m.step("add_new", "ok", 0.2)
    m.step("add_new", "retry", 0.05)
    m.step("add_new", "ok", 3.0)
    v = _values(m)
    assert v[("keyturn_step_attempts_total", (("result", "ok"), ("step", "add_new")))] == 2
    assert v[("keyturn_step_duration_seconds_count", (("step", "add_new"),))] == 3
    assert v[("keyturn_step_duration_seconds_sum", (("step", "add_new"),))] == pytest.approx(3.25)
    assert v[("keyturn_step_duration_seconds_bucket", (("le", "0.25"), ("step", "add_new")))] == 2


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def step(self, step: str, result: str, seconds: float) -> None:
        assert seconds >= 0
        self.seen.append((step, result))


@pytest.mark.parametrize(
    ("raised", "result", "goes_on"),
    [
        (None, "ok", True),
        (Waiting("k", "x", T0, T0, T0), "waiting", False),
        (KeyturnError("boom"), "retry", False),
        (RuntimeError("a bug"), "error", None),
    ],
)
def test_a_worker_counts_each_attempt_by_result(
    monkeypatch: pytest.MonkeyPatch, raised: BaseException | None, result: str, goes_on: Any
) -> None:
    """Worker._attempt with the step itself stubbed: what the recorder is told."""
    from keyturn.engine import worker as worker_module

    async def step(run: Any, trigger: Trigger) -> None:
        if raised is not None:
            raise raised

    async def nothing(*_: Any, **__: Any) -> Any:
        return "retry"

    monkeypatch.setattr(worker_module, "before_step", step)
    monkeypatch.setattr(worker_module, "run_step", nothing)
    recorder = _Recorder()
    w = object.__new__(Worker)
    w.deps = type("Deps", (), {"metrics": recorder})()  # type: ignore[assignment]
    monkeypatch.setattr(w, "_wait", nothing, raising=False)
    monkeypatch.setattr(w, "_failed", nothing, raising=False)
    if goes_on is None:
        with pytest.raises(RuntimeError):
            asyncio.run(w._attempt(None, Trigger.ADD_NEW))  # type: ignore[arg-type]
    else:
        assert asyncio.run(w._attempt(None, Trigger.ADD_NEW)) is goes_on  # type: ignore[arg-type]
    assert recorder.seen == [("add_new", result)]


def _rotation(**kw: Any) -> Rotation:
    values: dict[str, Any] = {
        "id": "r", "credential": "c", "kind": "k", "state": State.NEW_ADDED, "version": 1,
        "reason": "", "created_at": T0, "updated_at": T0 + timedelta(minutes=1),
    }  # fmt: skip
    values.update(kw)
    return Rotation(**values)


def test_since_when_a_rotation_needs_attention() -> None:
    now = T0 + timedelta(hours=5)
    hour = timedelta(hours=1)
    assert attention_since(_rotation(), now) is None
    assert attention_since(_rotation(halted_reason="x"), now) == T0 + timedelta(minutes=1)
    approval = _rotation(wait_key="gate.approval.before_start", wait_since=T0 + hour)
    assert attention_since(approval, now) == T0 + hour
    lost = _rotation(lease_owner="w", lease_expires_at=T0 + 2 * hour)
    assert attention_since(lost, now) == T0 + 2 * hour
    asked = _rotation(request=OperatorRequest(OperatorAction.PAUSE, "a", "r", T0 + 3 * hour))
    assert attention_since(asked, now) == T0 + 3 * hour
    waiting = _rotation(wait_key="forward.x", wait_since=T0, wait_deadline=T0 + 6 * hour)
    assert attention_since(waiting, now) == T0 + 3 * hour
    assert attention_since(_rotation(attempts=2), now) == T0 + timedelta(minutes=1)


def test_a_group_gets_the_status_its_rotations_have() -> None:
    def group(**kw: Any) -> RotationGroup:
        values: dict[str, Any] = {
            "state": State.PENDING, "requested": False, "paused": False, "halted": False,
            "wait_key": None, "waiting": False, "leased": False, "retried": False, "count": 1,
        }  # fmt: skip
        values.update(kw)
        return RotationGroup(**values)

    assert group_status(group()) == "due"
    assert group_status(group(retried=True)) == "retrying"
    assert group_status(group(retried=True, leased=True)) == "running"
    assert group_status(group(wait_key="gate.approval.x", waiting=True)) == "awaiting_approval"
    assert group_status(group(wait_key="forward.x", waiting=True)) == "waiting"
    assert group_status(group(halted=True, requested=True)) == "requested"
    assert group_status(group(state=State.CANCELLED)) == "done"
