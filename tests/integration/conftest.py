"""Sandbox fixtures shared by every integration test (owned by the sandbox helper).

- `sandbox`: a fresh sandbox subprocess per test, in tmp_path, stopped afterwards.
- `sandbox_factory(**kwargs)`: start more (same kwargs as `start_sandbox`); all are stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyturn.sandbox.testing import SandboxProcess, start_sandbox


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sandbox_factory(tmp_path: Path) -> Iterator[Callable[..., SandboxProcess]]:
    started: list[SandboxProcess] = []

    def factory(state_dir: Path | None = None, **kwargs: Any) -> SandboxProcess:
        directory = state_dir or tmp_path / f"sandbox-{len(started)}"
        process = start_sandbox(directory, **kwargs)
        started.append(process)
        return process

    yield factory
    for process in started:
        process.stop()


@pytest.fixture
def sandbox(sandbox_factory: Callable[..., SandboxProcess]) -> SandboxProcess:
    return sandbox_factory()
