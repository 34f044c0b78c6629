"""A process's own metrics on prometheus-client, in a registry of their own: the step attempts
and durations of the worker in this process (:class:`keyturn.ports.StepMetrics`) and the
requests its provider clients send (:data:`keyturn.ports.RequestObserver`), plus the standard
``process_*`` and ``python_*`` families. ``keyturn worker --metrics-port`` serves them;
``keyturn serve`` adds them to its /metrics.

The hot path is one dictionary lookup and a counter increment: the labelled children are made
once per label set and kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.exposition import start_http_server

from keyturn.domain.errors import KeyturnError

#: Step attempts last from milliseconds (a step that finds its work done) to minutes (a slow
#: provider, a long deploy); a wait ends its attempt at once.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def request_outcome(status: int | str) -> str:
    """2xx, 3xx, 4xx, 5xx, or timeout / connection when no response came."""
    if isinstance(status, int):
        return f"{status // 100}xx" if 100 <= status < 600 else "other"
    return status if status in ("timeout", "connection") else "other"


def error_class(status: int | str) -> str | None:
    """What kind of failure a request was (None: it was not one)."""
    if isinstance(status, str):
        return status if status in ("timeout", "connection") else "other"
    if status == 429:
        return "rate_limited"
    if 400 <= status < 500:
        return "client_error"
    if status >= 500:
        return "server_error"
    return None


class ProcessMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(standard)
        r = self.registry
        self._attempts = Counter(
            "keyturn_step_attempts",
            "Step attempts by this process's worker, by step (the trigger it fires) and result "
            "(ok: the transition was made; waiting; retry; halted; interrupted: an operator "
            "request came first; stopped; lease_lost; store_unavailable; error: a bug).",
            ["step", "result"],
            registry=r,
        )
        self._durations = Histogram(
            "keyturn_step_duration_seconds",
            "How long this process's step attempts took, by step.",
            ["step"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self._requests = Counter(
            "keyturn_provider_requests",
            "Requests this process sent to a provider, by provider, method and outcome (2xx, "
            "3xx, 4xx, 5xx, or timeout / connection when no response came).",
            ["provider", "method", "outcome"],
            registry=r,
        )
        self._errors = Counter(
            "keyturn_provider_errors",
            "Failed provider requests of this process, by provider and class (rate_limited, "
            "client_error, server_error, timeout, connection).",
            ["provider", "class"],
            registry=r,
        )
        self._steps: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._observers: dict[str, Callable[[str, int | str], None]] = {}

    # ------------------------------------------------------------------ StepMetrics

    def step(self, step: str, result: str, seconds: float) -> None:
        children = self._steps.get((step, result))
        if children is None:
            children = (self._attempts.labels(step, result), self._durations.labels(step))
            self._steps[(step, result)] = children
        children[0].inc()
        children[1].observe(seconds)

    # ------------------------------------------------------------------ provider requests

    def observer(self, provider: str) -> Callable[[str, int | str], None]:
        """The :data:`~keyturn.ports.RequestObserver` of `provider`'s clients."""
        found = self._observers.get(provider)
        if found is not None:
            return found
        children: dict[tuple[str, int | str], tuple[Any, Any]] = {}
        requests, errors = self._requests, self._errors

        def observe(method: str, status: int | str) -> None:
            pair = children.get((method, status))
            if pair is None:
                failed = error_class(status)
                pair = (
                    requests.labels(provider, method, request_outcome(status)),
                    errors.labels(provider, failed) if failed is not None else None,
                )
                children[(method, status)] = pair
            pair[0].inc()
            if pair[1] is not None:
                pair[1].inc()

        self._observers[provider] = observe
        return observe

    # ------------------------------------------------------------------ serving

    def serve(
        self,
        host: str,
        port: int,
        *,
        option: str = "--metrics-port",
        host_option: str = "--metrics-host",
    ) -> tuple[Any, int]:
        """Serve the registry at http://host:port/metrics from a daemon thread: (the server,
        the bound port). KeyturnError, in one line, when it cannot listen."""
        if not 0 <= port <= 65535:
            raise KeyturnError(
                f"{option} {port} is not a TCP port; use 1-65535, or 0 for a free one"
            )
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise KeyturnError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); pick another "
                f"{host_option} or {option}"
            ) from None
        return server, int(server.server_port)
