"""Fixtures of the end-to-end tests; the harness itself is in harness.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fleet import PgCluster
from harness import Kt, KtFactory


@pytest.fixture
def make_kt(tmp_path: Path) -> Iterator[Callable[..., Kt]]:
    """A :class:`KtFactory`'s ``make`` for this test; what it started stops after the test."""
    factory = KtFactory(tmp_path)
    yield factory.make
    factory.close()


@pytest.fixture
def pg_cluster(tmp_path: Path) -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster of this test's own (it may be stopped and restarted)."""
    cluster = PgCluster(tmp_path).init()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def kt(make_kt: Callable[..., Kt]) -> Kt:
    return make_kt()
