"""A delaying HTTP/1.1 reverse proxy for the benchmarks: every request is held DELAY_MS, then
forwarded to UPSTREAM, so a local server (moto) answers as a distant one would. It counts what
it forwards, by operation (the X-Amz-Target header of AWS's JSON protocols, else the method and
path).

    python tests/bench/delay_proxy.py UPSTREAM PORT DELAY_MS

``GET /_proxy/stats`` (never delayed, never forwarded, not counted): ``{"forwarded": n,
"by_operation": {...}, "in_flight": n, "max_in_flight": n}``. :func:`start_delay_proxy`
runs it as a subprocess and waits until it answers.

It is plain asyncio streams, no framework: it shares a small machine with the worker it
measures, so its own CPU per request is kept to a fraction of a millisecond (a Starlette app on
uvicorn forwarding with httpx cost ~3 ms per request, as much as moto). Requests are framed by
Content-Length (what boto3 sends); the upstream's answers by Content-Length, chunked encoding
or the end of the connection; keep-alive both ways, the upstream connections pooled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

#: Hop-by-hop headers (RFC 9110 7.6.1), and the framing this proxy sets itself.
_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
_LIMIT = 1 << 20

Headers = list[tuple[bytes, bytes]]


class BadMessage(Exception):
    """A message this proxy cannot frame."""


def _parse_head(head: bytes) -> tuple[bytes, Headers]:
    first, *lines = head[:-4].split(b"\r\n")
    headers = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise BadMessage(f"bad header line {line[:80]!r}")
        headers.append((name.strip().lower(), value.strip()))
    return first, headers


def _get(headers: Headers, name: bytes) -> bytes | None:
    return next((v for k, v in headers if k == name), None)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def _message(first: bytes, headers: Headers, body: bytes) -> bytes:
    lines = [first, *(k + b": " + v for k, v in headers if k not in _HOP)]
    lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class Upstream:
    """Keep-alive connections to the upstream server, reused one request at a time."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def exchange(self, request: bytes, method: bytes) -> tuple[bytes, Headers, bytes]:
        """Send one request; the status line, headers and body of the answer. A pooled
        connection the upstream closed meanwhile is replaced once."""
        while self._idle:
            reader, writer = self._idle.pop()
            try:
                return await self._on(reader, writer, request, method)
            except (OSError, asyncio.IncompleteReadError):
                writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=_LIMIT)
        return await self._on(reader, writer, request, method)

    async def _on(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: bytes,
        method: bytes,
    ) -> tuple[bytes, Headers, bytes]:
        writer.write(request)
        await writer.drain()
        status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
        code = int(status.split(b" ", 2)[1])
        reusable = (_get(headers, b"connection") or b"").lower() != b"close"
        length = _get(headers, b"content-length")
        if method == b"HEAD" or code in (204, 304) or 100 <= code < 200:
            body = b""
        elif length is not None:
            body = await reader.readexactly(int(length))
        elif b"chunked" in (_get(headers, b"transfer-encoding") or b"").lower():
            body = await _read_chunked(reader)
        else:
            body, reusable = await reader.read(), False
        if reusable:
            self._idle.append((reader, writer))
        else:
            writer.close()
        return status, headers, body


class DelayProxyServer:
    def __init__(self, upstream: str, delay_ms: float) -> None:
        self.upstream = Upstream(upstream)
        self.delay_ms = delay_ms
        self.delay = delay_ms / 1000
        self.by_operation: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0

    def stats(self) -> dict[str, Any]:
        return {
            "forwarded": sum(self.by_operation.values()),
            "by_operation": dict(self.by_operation),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "delay_ms": self.delay_ms,
        }

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client closed its keep-alive connection
                first, headers = _parse_head(head)
                method, target, _version = first.split(b" ", 2)
                if b"chunked" in (_get(headers, b"transfer-encoding") or b"").lower():
                    raise BadMessage("chunked request bodies are not supported")
                body = await reader.readexactly(int(_get(headers, b"content-length") or 0))
                writer.write(await self.answer(method, target, headers, body))
                await writer.drain()
                if (_get(headers, b"connection") or b"").lower() == b"close":
                    return
        except (BadMessage, ValueError, OSError, asyncio.IncompleteReadError) as exc:
            with contextlib.suppress(OSError):
                text = f"delay proxy: {exc}".encode()
                writer.write(_message(b"HTTP/1.1 502 Bad Gateway", [], text))
                await writer.drain()
        finally:
            writer.close()

    async def answer(self, method: bytes, target: bytes, headers: Headers, body: bytes) -> bytes:
        if method == b"GET" and target == b"/_proxy/stats":
            content = json.dumps(self.stats()).encode()
            return _message(b"HTTP/1.1 200 OK", [(b"content-type", b"application/json")], content)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            request = _message(b"%s %s HTTP/1.1" % (method, target), headers, body)
            status, answer_headers, content = await self.upstream.exchange(request, method)
        finally:
            self.in_flight -= 1
        amz = _get(headers, b"x-amz-target")
        path = target.split(b"?", 1)[0]
        operation = amz.decode() if amz else f"{method.decode()} {path.decode()}"
        self.by_operation[operation] += 1
        return _message(status, answer_headers, content)


async def serve(upstream: str, port: int, delay_ms: float) -> None:
    proxy = DelayProxyServer(upstream, delay_ms)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", port, backlog=1024, limit=_LIMIT)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    upstream, port, delay_ms = argv[0], int(argv[1]), float(argv[2])
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(upstream, port, delay_ms))


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
