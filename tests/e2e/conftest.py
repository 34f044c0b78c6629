"""Fixtures of the end-to-end tests; the harness itself is in harness.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import LEASE_PATCH, Kt

from keyturn.sandbox.testing import SandboxProcess, start_sandbox


@pytest.fixture
def make_kt(tmp_path: Path) -> Iterator[Callable[..., Kt]]:
    started: list[SandboxProcess] = []

    def make(db_url: str | None = None, **sandbox_kwargs: Any) -> Kt:
        sandbox = start_sandbox(tmp_path / f"sandbox-{len(started)}", **sandbox_kwargs)
        started.append(sandbox)
        kt = Kt(tmp_path / f"work-{len(started)}", sandbox, db_url)
        kt.run("init", str(kt.workdir), "--sandbox-bootstrap", str(sandbox.bootstrap_path))
        # A short lease, so a worker killed here is taken over within seconds, and fast retries.
        text = kt.config.read_text()
        for old, new in LEASE_PATCH:
            assert old in text
            text = text.replace(old, new)
        kt.config.write_text(text)
        return kt

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def kt(make_kt: Callable[..., Kt]) -> Kt:
    return make_kt()
