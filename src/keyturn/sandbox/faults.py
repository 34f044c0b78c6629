"""Fault injection: configuration (flags at start, `/_sandbox/faults` at run time) and the rolls.

Faults apply to the Dfns routes only. `paths` (a list of "METHOD /route/template" or
"METHOD /concrete/path") restricts every fault except the per-organisation rate limit; an empty
list means every Dfns route.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

DROP = "drop"
FAIL_500 = "500"


class FaultConfigError(ValueError):
    """A fault setting that cannot be used (message names the field and the fix)."""


@dataclass(frozen=True)
class FaultConfig:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    rate_429: float = 0.0
    hang_rate: float = 0.0
    hang_seconds: float = 30.0
    rate_limit_per_minute: int = 0  # 0: unlimited
    apply_then_fail_rate: float = 0.0
    apply_then_fail_mode: str = FAIL_500
    paths: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("error_rate", "rate_429", "hang_rate", "apply_then_fail_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise FaultConfigError(f"{name} must be a share between 0 and 1, got {value}")
        for name in ("latency_ms", "hang_seconds"):
            if getattr(self, name) < 0:
                raise FaultConfigError(f"{name} must be zero or positive")
        if self.rate_limit_per_minute < 0:
            raise FaultConfigError("rate_limit_per_minute must be zero (off) or positive")
        if self.apply_then_fail_mode not in (FAIL_500, DROP):
            raise FaultConfigError(
                f'apply_then_fail_mode must be "500" or "drop", got {self.apply_then_fail_mode!r}'
            )
        for path in self.paths:
            method, _, route = path.partition(" ")
            if not method.isalpha() or not route.startswith("/"):
                raise FaultConfigError(
                    f'paths entries look like "POST /auth/credentials", got {path!r}'
                )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def updated(self, changes: dict[str, Any]) -> FaultConfig:
        """A copy with `changes` applied; FaultConfigError on unknown fields or bad values."""
        known = {f.name: f for f in fields(self)}
        typed: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in known:
                raise FaultConfigError(
                    f"unknown fault field {name!r}; known fields: {', '.join(sorted(known))}"
                )
            typed[name] = _coerce(name, value)
        return replace(self, **typed)


def _coerce(name: str, value: Any) -> Any:
    if name == "paths":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise FaultConfigError('paths must be a list of strings like "POST /auth/credentials"')
        return [" ".join(v.split()) for v in value]
    if name == "apply_then_fail_mode":
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultConfigError(f"{name} must be a number, got {value!r}")
    if name == "rate_limit_per_minute":
        if int(value) != value:
            raise FaultConfigError("rate_limit_per_minute must be a whole number")
        return int(value)
    return float(value)


@dataclass
class FaultCounters:
    error_500: int = 0
    rate_429: int = 0
    hang: int = 0
    rate_limited: int = 0
    apply_then_fail: int = 0


class Faults:
    """Current configuration, counters and the per-organisation sliding-window rate limiter."""

    def __init__(self, config: FaultConfig, *, seed: int | None = None) -> None:
        self.config = config
        self.counters = FaultCounters()
        self._random = random.Random(seed)
        self._windows: dict[str, deque[float]] = {}

    def applies(self, route_key: str, concrete_key: str) -> bool:
        paths = self.config.paths
        return not paths or route_key in paths or concrete_key in paths

    def roll(self, share: float) -> bool:
        return share > 0 and self._random.random() < share

    def over_rate_limit(self, org: str) -> bool:
        """Record one request for `org`; True when it exceeds the per-minute limit."""
        limit = self.config.rate_limit_per_minute
        if limit <= 0:
            return False
        now = time.monotonic()
        window = self._windows.setdefault(org, deque())
        while window and window[0] <= now - 60.0:
            window.popleft()
        if len(window) >= limit:
            return True
        window.append(now)
        return False
