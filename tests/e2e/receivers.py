"""Sink-shaped HTTP receivers for the notification tests (imported as `receivers`): one local
server records every POST (path, headers, body); until `fail_until` it answers 500."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receivers:
    """PagerDuty-, Slack- and webhook-shaped endpoints on one local HTTP server. Until
    `fail_until` (monotonic) every request gets a 500 after `delay` seconds."""

    server: ThreadingHTTPServer
    got: list[Received] = field(default_factory=list)
    fail_until: float = 0.0
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.got.clear()
        self.fail_until, self.delay = 0.0, 0.0

    def at(self, prefix: str, *, ok: bool = True) -> list[Received]:
        with self.lock:
            return [r for r in self.got if r.path.startswith(prefix) and (r.status < 300) == ok]


def start_receivers() -> Receivers:
    holder: dict[str, Receivers] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            rec = holder["r"]
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if rec.delay:
                time.sleep(rec.delay)
            status = 500 if time.monotonic() < rec.fail_until else 200
            if status == 200 and self.path.startswith("/pd"):
                status = 202
            with rec.lock:
                rec.got.append(
                    Received(self.path, dict(self.headers), body, time.monotonic(), status)
                )
            out = b'{"status":"success"}' if status < 300 else b"internal error"
            self.send_response(status)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder["r"] = Receivers(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return holder["r"]
