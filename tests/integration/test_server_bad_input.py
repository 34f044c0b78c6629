"""The two servers refuse bad input with one line starting `keyturn: error:`, a non-zero exit,
no traceback, and nothing created."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

KEYTURN = [sys.executable, "-m", "keyturn"]


def _taken_port() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--port", "99999"], "--port 99999 is not a TCP port"),
        (["--port", "-1"], "--port -1 is not a TCP port"),
        (["--host", "203.0.113.7", "--port", "0"], "cannot listen on 203.0.113.7:0"),
        (["--event-rate", "-2"], "--event-rate must be zero or positive"),
    ],
)
def test_sandbox_serve_refuses_before_creating_its_state(
    tmp_path: Path, args: list[str], says: str
) -> None:
    state = tmp_path / "state"
    done = subprocess.run(
        [*KEYTURN, "sandbox", "serve", "--state-dir", str(state), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyturn: error: "), done.stderr
    assert says in lines[0] and "Traceback" not in done.stderr
    assert not state.exists()


def test_sandbox_serve_on_a_taken_port(tmp_path: Path) -> None:
    held, port = _taken_port()
    with held:
        done = subprocess.run(
            [*KEYTURN, "sandbox", "serve", "--state-dir", str(tmp_path / "s"), "--port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"keyturn: error: cannot listen on 127.0.0.1:{port}")
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_receiver_serve_refuses_a_missing_secrets_file(tmp_path: Path) -> None:
    done = subprocess.run(
        [*KEYTURN, "receiver", "serve", "--secrets", str(tmp_path / "none.json"), "--port", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyturn: error: secrets file "), done.stderr
