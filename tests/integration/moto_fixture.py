"""A throwaway moto server (AWS Secrets Manager) for the aws_secrets_manager tests: a real
server process on a free 127.0.0.1 port, started without the caller's AWS_* environment."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = "pip install 'keyturn[aws]' 'moto[server]>=5.0' (or the dev extra)"

#: What the standard credential chain of a process talking to moto needs (dummy values).
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def moto_server_binary() -> str:
    found = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    found = found or shutil.which("moto_server")
    if found is None:
        pytest.fail(f"moto_server is not installed; {INSTALL_HINT}", pytrace=False)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MotoServer:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):  # noqa: S310 (http to localhost)
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False


def start_moto(directory: Path) -> MotoServer:
    """A moto server on a free port, once it answers (a port taken meanwhile: another one)."""
    binary = moto_server_binary()
    for attempt in range(3):
        port = free_port()
        log = directory / f"moto-{port}-{attempt}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [binary, "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            )
        server = MotoServer(process, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and process.poll() is None:
            if answers(server.url):
                return server
            time.sleep(0.1)
        server.stop()
    tail = log.read_text(errors="replace")[-2000:]
    pytest.fail(f"moto_server did not start (last log):\n{tail}", pytrace=False)
