"""No generic module names a credential kind: the engine, the configuration and the command
line know kinds only through the plugin registry (issue 10's check, kept)."""

from __future__ import annotations

import re
from pathlib import Path

from keyturn.engine.registry import discovered

SRC = Path(__file__).resolve().parents[2] / "src" / "keyturn"
GENERIC = [SRC / "engine", SRC / "config.py", SRC / "cli"]


def test_generic_code_names_no_kind() -> None:
    names = {n.replace("_", "[ _-]?") for n in discovered().kinds} | {"webhook", "passkey"}
    pattern = re.compile(r"\b(" + "|".join(sorted(names)) + r")s?\b", re.IGNORECASE)
    hits = []
    for root in GENERIC:
        for path in [root] if root.is_file() else sorted(root.rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    hits.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert hits == []
