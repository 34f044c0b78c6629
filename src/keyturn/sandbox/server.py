"""Run the sandbox under uvicorn and publish bootstrap.json once it is ready to serve."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from keyturn.sandbox.app import Sandbox, SandboxSettings, build_app

BOOTSTRAP_FILE = "bootstrap.json"


def write_private_json(path: Path, document: dict[str, Any]) -> None:
    """Write `document` to `path` atomically with mode 0600 (it holds private keys)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, json.dumps(document, indent=2).encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _public_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::"):  # noqa: S104 - mapping a wildcard bind to loopback
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT ends in a clean exit (code 0) after the graceful
    shutdown instead of re-raising the signal."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(settings: SandboxSettings, *, host: str, port: int) -> None:
    """Serve in the foreground until SIGTERM/SIGINT."""
    sandbox = Sandbox(settings)
    bootstrap_path = settings.state_dir / BOOTSTRAP_FILE
    bootstrap_path.unlink(missing_ok=True)
    config = uvicorn.Config(
        build_app(sandbox),
        host=host,
        port=port,
        http="h11",
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
        timeout_keep_alive=30,
    )
    server = _Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.01)
        sockets = [s for srv in server.servers for s in srv.sockets]
        bound_port = sockets[0].getsockname()[1] if sockets else port
        document = sandbox.bootstrap_document(f"http://{_public_host(host)}:{bound_port}")
        document["pid"] = os.getpid()
        write_private_json(bootstrap_path, document)
        await task

    try:
        asyncio.run(main())
    finally:
        sandbox.store.close()
