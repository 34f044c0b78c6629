"""A delaying HTTP reverse proxy for the benchmarks: every request is held DELAY_MS, then
forwarded to UPSTREAM (Starlette on uvicorn, httpx to the upstream), so a local server (moto)
answers as a distant one would. It counts what it forwards, by operation (the X-Amz-Target
header of AWS's JSON protocols, else the method and path).

    python tests/bench/delay_proxy.py UPSTREAM PORT DELAY_MS

``GET /_proxy/stats`` (never delayed, never forwarded, not counted): ``{"forwarded": n,
"by_operation": {...}, "in_flight": n, "max_in_flight": n}``. :func:`start_delay_proxy`
runs it as a subprocess and waits until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

#: Hop-by-hop headers (RFC 9110 7.6.1) and the ones httpx computes itself.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


def make_app(upstream: str, delay_ms: float) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    delay = delay_ms / 1000
    by_operation: Counter[str] = Counter()
    flight = {"now": 0, "max": 0}
    client = httpx.AsyncClient(
        base_url=upstream,
        timeout=60,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
    )

    async def stats(_request: Request) -> Response:
        return JSONResponse(
            {
                "forwarded": sum(by_operation.values()),
                "by_operation": dict(by_operation),
                "in_flight": flight["now"],
                "max_in_flight": flight["max"],
                "delay_ms": delay_ms,
            }
        )

    async def forward(request: Request) -> Response:
        body = await request.body()
        flight["now"] += 1
        flight["max"] = max(flight["max"], flight["now"])
        try:
            await asyncio.sleep(delay)
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
            path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            answer = await client.request(request.method, path, headers=headers, content=body)
        finally:
            flight["now"] -= 1
        operation = request.headers.get("x-amz-target") or f"{request.method} {request.url.path}"
        by_operation[operation] += 1
        out_headers = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP}
        out_headers.pop("content-encoding", None)  # httpx decoded the body
        return Response(answer.content, status_code=answer.status_code, headers=out_headers)

    methods = ["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"]
    return Starlette(
        routes=[
            Route("/_proxy/stats", stats, methods=["GET"]),
            Route("/{path:path}", forward, methods=methods),
        ]
    )


def main(argv: list[str]) -> None:
    import uvicorn

    upstream, port, delay_ms = argv[0], int(argv[1]), float(argv[2])
    uvicorn.run(
        make_app(upstream, delay_ms),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        backlog=1024,
    )


# ------------------------------------------------------------------------------ the starter


@dataclass
class DelayProxy:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def stats(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/_proxy/stats", timeout=10)
        r.raise_for_status()
        return dict(r.json())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_delay_proxy(upstream: str, delay_ms: float, directory: Path) -> DelayProxy:
    """The proxy in a subprocess on a free port, once it answers."""
    port = _free_port()
    log = directory / f"delay-proxy-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, __file__, upstream, str(port), str(delay_ms)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proxy = DelayProxy(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            proxy.stats()
            return proxy
        time.sleep(0.1)
    proxy.stop()
    raise AssertionError(f"the delay proxy did not start: {log.read_text(errors='replace')}")


if __name__ == "__main__":
    main(sys.argv[1:])
