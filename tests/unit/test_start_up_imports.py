"""A command imports only what it needs (issue 12, start-up): the read commands an on-call
engineer types most never load the worker's logging stack, rich (when piped), the ORM,
Alembic, httpx, cryptography or the optional integrations. (The PostgreSQL dialect does load:
declaring the partial indexes with ``postgresql_where`` makes SQLAlchemy import it.)
tests/bench/test_startup.py measures the time; this checks the cause, in a fresh interpreter per
command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keyturn.adapters.store.migrate import upgrade

PROBE = """
import json, sys
sys.argv = ["keyturn", *json.loads(sys.argv[1])]
from keyturn.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
with open(OUT, "w") as f:
    json.dump({"exit": code, "modules": sorted(sys.modules)}, f)
"""

#: Loaded by no read command on SQLite when its output is piped.
NEVER = (
    "structlog",
    "rich",
    "sqlalchemy.orm",
    "alembic",
    "httpx",
    "cryptography",
    "boto3",
    "hvac",
    "starlette",
    "uvicorn",
    "prometheus_client",
)


def _loaded(tmp_path: Path, args: list[str]) -> tuple[int, set[str]]:
    out = tmp_path / "modules.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")}
    env["KEYTURN_CONFIG"] = str(tmp_path / "keyturn.toml")
    subprocess.run(
        [sys.executable, "-c", f"OUT = {str(out)!r}\n" + PROBE, json.dumps(args)],
        env=env,
        cwd=tmp_path,
        capture_output=True,  # not a terminal: the piped path
        check=True,
    )
    data = json.loads(out.read_text())
    return data["exit"], set(data["modules"])


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "keyturn.toml").write_text(
        '[database]\nurl = "sqlite:///keyturn.db"\n\n'
        '[providers.p]\nbase_url = "http://127.0.0.1:9"\n'
    )
    upgrade(f"sqlite:///{tmp_path / 'keyturn.db'}")
    return tmp_path


def _offenders(modules: set[str], never: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in never))


@pytest.mark.parametrize(
    "args",
    [
        ["rotations", "list"],
        ["rotations", "list", "--json"],
        ["credentials", "list"],
        ["workers"],
    ],
    ids=" ".join,
)
def test_read_commands_load_only_what_they_need(workdir: Path, args: list[str]) -> None:
    code, modules = _loaded(workdir, args)
    assert code == 0
    assert "sqlalchemy" in modules  # the probe really ran the command against the store
    assert _offenders(modules, NEVER) == []


@pytest.mark.parametrize("args", [["--version"], ["rotations", "list", "--help"]], ids=" ".join)
def test_help_and_version_load_neither_store_nor_config(workdir: Path, args: list[str]) -> None:
    code, modules = _loaded(workdir, args)
    assert code == 0
    # (typer itself brings pydantic in to describe a command's options)
    assert _offenders(modules, ("sqlalchemy", "keyturn.config", "structlog", "alembic")) == []


def test_logging_settings_apply_when_structlog_is_first_imported() -> None:
    code = """
import sys
from keyturn import logs
logs.configure("json", "warning")
assert "structlog" not in sys.modules, "configure imported structlog"
import structlog
structlog.get_logger().info("dropped")
structlog.get_logger().warning("kept", n=1)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = json.loads(lines[0])
    assert (line["event"], line["level"], line["n"]) == ("kept", "warning", 1)
    assert proc.stdout == ""
