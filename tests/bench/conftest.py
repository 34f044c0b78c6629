"""Benchmarks (`make bench`, not part of `make test`): figures are printed and written to
tests/bench/results/*.json; no test here asserts a timing."""

from __future__ import annotations

import sys
from pathlib import Path

# The provider-bound bench reuses the e2e fleet (tests/e2e/fleet.py imports `harness`).
E2E = str(Path(__file__).resolve().parents[1] / "e2e")
if E2E not in sys.path:
    sys.path.insert(0, E2E)
