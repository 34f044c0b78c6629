"""Sandbox fixtures shared by every integration test (owned by the sandbox helper).

- `sandbox`: a fresh sandbox subprocess per test, in tmp_path, stopped afterwards.
- `sandbox_factory(**kwargs)`: start more (same kwargs as `start_sandbox`); all are stopped.
- `start_demo(*args)`: the holder demo service (see demo_fixture).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from demo_fixture import start_demo  # noqa: F401 (a fixture for the tests here)

from keyturn.sandbox.testing import SandboxProcess, start_sandbox


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sandbox_factory(tmp_path: Path) -> Iterator[Callable[..., SandboxProcess]]:
    started: list[SandboxProcess] = []

    def factory(state_dir: Path | None = None, **kwargs: Any) -> SandboxProcess:
        directory = state_dir or tmp_path / f"sandbox-{len(started)}"
        process = start_sandbox(directory, **kwargs)
        started.append(process)
        return process

    yield factory
    for process in started:
        process.stop()


@pytest.fixture
def sandbox(sandbox_factory: Callable[..., SandboxProcess]) -> SandboxProcess:
    return sandbox_factory()


class WebhookReceiver:
    """A real HTTP server in a thread that records every POST (headers, raw body).

    `status_code` is what it answers (set it to 500 to make deliveries fail).
    """

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.status_code = 200
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = (
                True  # else delayed ACKs cap it near 25 requests/s per connection
            )

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.received.append(
                        ({k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    status = receiver.status_code
                payload = b'{"ok":true}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def handle(self) -> None:
                # the sandbox may close a keep-alive connection at any time
                with contextlib.suppress(ConnectionError):
                    super().handle()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def events(self) -> list[tuple[dict[str, str], bytes]]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()
