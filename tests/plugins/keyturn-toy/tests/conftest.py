from __future__ import annotations

from pathlib import Path

import pytest
from toyenv import Toy, make_toy


@pytest.fixture
def toy(tmp_path: Path) -> Toy:
    return make_toy(tmp_path / "work")
