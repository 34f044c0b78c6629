"""The reference webhook receiver: `keyturn receiver serve --secrets FILE --port P`.

A Starlette app built on :class:`keyturn.webhooks.WebhookSignatureMiddleware`. Every POST (any
path) is verified against the secrets in FILE (reloaded when keyturn replaces it); accepted events
are answered 200 and recorded, refused ones 401 with the reason. ``GET /_receiver/state``
reports the counters and the secrets version in force, so a deployer can confirm the receiver
loaded a given set before it enables a webhook signed with a new secret::

    {"accepted": 12, "rejected": 0, "duplicates": 0, "rejections": {},
     "secrets_version": "3f2a…", "secrets_count": 2, "secrets_error": null,
     "accepted_ids": [...], "rejected_events": [...]}      # the two lists only with ?ids=1

`--record FILE` appends one JSON line per delivery (accepted, duplicate or rejected), flushed
at once, so tests that kill processes can still count. :func:`start_receiver` runs it as a
subprocess for tests (`python -m keyturn.receiver serve ...`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Annotated, Any, Final

import httpx
import typer
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keyturn.webhooks import (
    DEFAULT_TOLERANCE,
    STATE_KEY,
    SecretsFile,
    SecretsFileError,
    SignatureError,
    Verified,
    WebhookSignatureMiddleware,
)

__all__ = [
    "STATE_PATH",
    "ReceiverError",
    "ReceiverProcess",
    "ReceiverRecorder",
    "app",
    "build_app",
    "start_receiver",
]

STATE_PATH: Final = "/_receiver/state"
_OK: Final = b'{"ok":true}'
_DUPLICATE: Final = b'{"ok":true,"duplicate":true}'


# ------------------------------------------------------------------------------------ the app


class ReceiverRecorder:
    """Counters and ids of what the receiver accepted and refused (one event loop thread)."""

    def __init__(self, secrets: SecretsFile, record: IO[str] | None = None) -> None:
        self.secrets = secrets
        self.accepted = 0
        self.rejected = 0
        self.duplicates = 0
        self.accepted_ids: list[str] = []
        self._seen: set[str] = set()
        self.rejections: Counter[str] = Counter()
        self.rejected_events: list[tuple[str, str | None]] = []
        self._record = record

    def _write(self, line: dict[str, Any]) -> None:
        if self._record is not None:
            self._record.write(json.dumps(line, separators=(",", ":")) + "\n")
            self._record.flush()

    def accept(self, verified: Verified, path: str) -> bool:
        """Record an accepted delivery; False when its event id was already accepted."""
        event_id = verified.event_id
        if event_id is not None and event_id in self._seen:
            self.duplicates += 1
            self._write({"t": time.time(), "result": "duplicate", "id": event_id})
            return False
        self.accepted += 1
        if event_id is not None:
            self._seen.add(event_id)
            self.accepted_ids.append(event_id)
        self._write(
            {
                "t": time.time(),
                "result": "accepted",
                "id": event_id,
                "kind": verified.kind,
                "secret_index": verified.secret_index,
                "path": path,
            }
        )
        return True

    def reject(self, error: SignatureError, scope: Any) -> None:
        self.rejected += 1
        self.rejections[error.reason] += 1
        self.rejected_events.append((error.reason, error.event_id))
        self._write(
            {
                "t": time.time(),
                "result": "rejected",
                "reason": error.reason,
                "id": error.event_id,
                "path": scope.get("path"),
            }
        )

    def snapshot(self, *, ids: bool = False) -> dict[str, Any]:
        version, secrets = self.secrets.snapshot()
        state: dict[str, Any] = {
            "accepted": self.accepted,
            "rejected": self.rejected,
            "duplicates": self.duplicates,
            "rejections": dict(self.rejections),
            "secrets_version": version,
            "secrets_count": len(secrets),
            "secrets_error": self.secrets.error,
            "pid": os.getpid(),
        }
        if ids:
            state["accepted_ids"] = list(self.accepted_ids)
            state["rejected_events"] = [
                {"reason": reason, "id": event_id} for reason, event_id in self.rejected_events
            ]
        return state


def build_app(
    secrets: SecretsFile,
    *,
    record: IO[str] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Starlette:
    """The reference receiver; its :class:`ReceiverRecorder` is ``app.state.recorder``."""
    recorder = ReceiverRecorder(secrets, record)

    async def receive_event(request: Request) -> Response:
        verified: Verified = request.scope["state"][STATE_KEY]
        fresh = recorder.accept(verified, request.url.path)
        return Response(_OK if fresh else _DUPLICATE, media_type="application/json")

    async def state(request: Request) -> Response:
        ids = request.query_params.get("ids") in ("1", "true", "yes")
        return JSONResponse(recorder.snapshot(ids=ids))

    application = Starlette(
        routes=[
            Route(STATE_PATH, state, methods=["GET"]),
            Route("/{path:path}", receive_event, methods=["POST"]),
        ],
        middleware=[
            Middleware(
                WebhookSignatureMiddleware,
                secrets=secrets,
                tolerance=tolerance,
                on_reject=recorder.reject,
            )
        ],
    )
    application.state.recorder = recorder
    return application


# ------------------------------------------------------------------------------------ serving


class _Server(uvicorn.Server):
    """uvicorn's server, but SIGTERM/SIGINT end in exit code 0 after the graceful shutdown."""

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


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only then, and
    # without it Nagle's algorithm holds each response body back ~40 ms (delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _write_ready_file(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(document))
    tmp.replace(path)


app = typer.Typer(
    help="The reference webhook receiver: verifies Dfns webhook signatures with several secrets.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """The reference webhook receiver: verifies Dfns webhook signatures with several secrets."""


@app.command()
def serve(
    secrets: Annotated[
        Path,
        typer.Option(help="The secrets file keyturn deploys (JSON; reloaded when it changes)."),
    ],
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one.")] = 0,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    record: Annotated[
        Path | None,
        typer.Option(help="Append one JSON line per delivery (accepted or rejected) here."),
    ] = None,
    ready_file: Annotated[
        Path | None,
        typer.Option(help='Write {"url", "pid"} here once the receiver serves.'),
    ] = None,
    tolerance: Annotated[
        float, typer.Option(help="Refuse events whose timestampSent is further from now (s).")
    ] = DEFAULT_TOLERANCE,
) -> None:
    """Serve the receiver in the foreground; SIGTERM or Ctrl-C stops it."""
    if tolerance <= 0:
        typer.echo("keyturn: error: --tolerance must be greater than 0", err=True)
        raise typer.Exit(2)
    try:
        secrets_file = SecretsFile(secrets)
    except SecretsFileError as exc:
        typer.echo(f"keyturn: error: {exc} (--secrets {secrets})", err=True)
        raise typer.Exit(1) from None
    try:
        sock = _bind(host, port)
    except OSError as exc:
        typer.echo(
            f"keyturn: error: cannot listen on {host}:{port} ({exc.strerror or exc}); pick another"
            " --port or --host",
            err=True,
        )
        raise typer.Exit(1) from None
    record_stream: IO[str] | None = None
    if record is not None:
        try:
            record_stream = record.open("a", encoding="utf-8")
        except OSError as exc:
            sock.close()
            typer.echo(f"keyturn: error: cannot open --record {record} ({exc.strerror})", err=True)
            raise typer.Exit(1) from None
    try:
        _run(secrets_file, sock, host, record_stream, ready_file, tolerance)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        if record_stream is not None:
            record_stream.close()


def _run(
    secrets_file: SecretsFile,
    sock: socket.socket,
    host: str,
    record: IO[str] | None,
    ready_file: Path | None,
    tolerance: float,
) -> None:
    application = build_app(secrets_file, record=record, tolerance=tolerance)
    config = uvicorn.Config(
        application,
        http="h11",
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
        timeout_keep_alive=30,
        backlog=2048,
    )
    server = _Server(config)
    bound_port = sock.getsockname()[1]
    public = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104
    url = f"http://{'[' + public + ']' if ':' in public else public}:{bound_port}"

    async def serve_forever() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.01)
        version, secrets = secrets_file.snapshot()
        print(
            f"keyturn receiver: listening on {url} (secrets version {version},"
            f" {len(secrets)} secret(s))",
            file=sys.stderr,
            flush=True,
        )
        if ready_file is not None:
            _write_ready_file(ready_file, {"url": url, "pid": os.getpid()})
        await task

    asyncio.run(serve_forever())


# ------------------------------------------------------------------------------ testing helper

STARTUP_TIMEOUT: Final = 20.0


class ReceiverError(RuntimeError):
    """The receiver process did not start or answer (the message ends with its log tail)."""


class ReceiverProcess:
    """A receiver subprocess; see :func:`start_receiver`."""

    def __init__(
        self,
        secrets_file: Path,
        *,
        port: int | None = None,
        record: Path | None = None,
        tolerance: float | None = None,
    ) -> None:
        self.secrets_file = Path(secrets_file)
        self.port = port
        self.record = record
        self.tolerance = tolerance
        self.url = ""
        self._runtime = Path(tempfile.mkdtemp(prefix="keyturn-receiver-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._http = httpx.Client(timeout=10.0)

    def __repr__(self) -> str:
        return f"ReceiverProcess(url={self.url!r}, secrets_file={str(self.secrets_file)!r})"

    @property
    def log_path(self) -> Path:
        return self._runtime / "receiver.log"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise ReceiverError("the receiver is not running; call start()")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "keyturn.receiver",
            "serve",
            "--secrets",
            str(self.secrets_file),
            "--port",
            str(self.port or 0),
            "--ready-file",
            str(self._runtime / "ready.json"),
        ]
        if self.record is not None:
            command += ["--record", str(self.record)]
        if self.tolerance is not None:
            command += ["--tolerance", str(self.tolerance)]
        return command

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        tail = [line for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(tail) if tail else "(empty log)"

    def start(self) -> ReceiverProcess:
        if self.running:
            raise ReceiverError("the receiver is already running; stop() it first")
        ready = self._runtime / "ready.json"
        ready.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise ReceiverError(
                    f"the receiver exited with code {code} during startup;"
                    f" its log ends with: {self.log_tail()}"
                )
            with contextlib.suppress(OSError, ValueError):
                document = json.loads(ready.read_text())
                if document.get("pid") == self._proc.pid:
                    self.url = str(document["url"])
                    self.port = int(self.url.rsplit(":", 1)[1])
                    self.state()
                    return self
            time.sleep(0.02)
        self.kill()
        raise ReceiverError(
            f"the receiver did not start within {STARTUP_TIMEOUT:.0f} s;"
            f" its log ends with: {self.log_tail()}"
        )

    def state(self, *, ids: bool = False) -> dict[str, Any]:
        """``GET /_receiver/state`` (with the id lists when `ids`)."""
        url = self.url + STATE_PATH + ("?ids=1" if ids else "")
        try:
            response = self._http.get(url)
            document: dict[str, Any] = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ReceiverError(
                f"the receiver at {self.url} did not answer: {type(exc).__name__};"
                f" its log ends with: {self.log_tail()}"
            ) from None
        return document

    def wait_for_version(self, version: str, timeout: float = 10.0) -> dict[str, Any]:
        """Poll the state until the receiver reports `version`; the state then."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if state["secrets_version"] == version:
                return state
            if time.monotonic() >= deadline:
                raise ReceiverError(
                    f"the receiver still reports secrets version {state['secrets_version']}"
                    f" after {timeout:.0f} s, not {version}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout`); the exit code, None if not running."""
        proc, self._proc = self._proc, None
        self._http.close()
        self._http = httpx.Client(timeout=10.0)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL (a crash)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Stop the process and remove its runtime directory (log, ready file)."""
        self.stop()
        self._http.close()
        shutil.rmtree(self._runtime, ignore_errors=True)

    def __enter__(self) -> ReceiverProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_receiver(
    secrets_file: Path,
    *,
    port: int | None = None,
    record: Path | None = None,
    tolerance: float | None = None,
) -> ReceiverProcess:
    """Start ``python -m keyturn.receiver serve`` and wait until it answers.

    `port` None lets the receiver pick a free one (read it from ``.url``/``.port``). Call
    ``.close()`` (or use it as a context manager) to stop it and remove its runtime files.
    """
    return ReceiverProcess(secrets_file, port=port, record=record, tolerance=tolerance).start()


if __name__ == "__main__":
    app()
