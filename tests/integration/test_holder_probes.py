"""The ``http`` and ``command`` probes against a real holder: keyturn.holders' route served by
uvicorn on a free port of loopback. A holder that is down or answers nonsense is a KeyturnError
naming the probe."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from keyturn.adapters.deploy import FileTarget
from keyturn.adapters.keys import CryptoKeys
from keyturn.domain.errors import KeyturnError
from keyturn.holders import HeldKey, starlette_routes
from keyturn.kinds.signing_key import fingerprint
from keyturn.ports import DeployedMaterial
from keyturn.targets.holders import COMMAND_PROBE, HTTP, CommandProbeConfig, HttpProbeConfig

KEYS = CryptoKeys()
PY = sys.executable
SERVICES: Any = None  # the probes use nothing of keyturn's services


class Server:
    """A uvicorn server in a thread, on a socket bound before it starts (no port race)."""

    def __init__(self, app: Starlette) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[Server] = []

    def start(app: Starlette) -> Server:
        servers.append(Server(app))
        return servers[-1]

    yield start
    for server in servers:
        if server.thread.is_alive():
            server.stop()


def deployed(directory: Path, n: int, algorithm: str = "ed25519") -> tuple[DeployedMaterial, str]:
    key = KEYS.generate(algorithm)
    material = DeployedMaterial(key.private_pem, f"Y3JlZC0{n}", f"cr-{n:04d}")
    FileTarget("holder", directory).deploy(material)
    return material, fingerprint(key.public_pem)


def http_probe(url: str, **options: Any) -> Any:
    config = HttpProbeConfig(type="http", name="api-holder", url=url, **options)
    return HTTP.build(config, SERVICES)


def command_probe(argv: list[str], **options: Any) -> Any:
    config = CommandProbeConfig(type="command", name="api-cmd", command=argv, **options)
    return COMMAND_PROBE.build(config, SERVICES)


def test_the_plugins_declare_themselves() -> None:
    assert (HTTP.type, COMMAND_PROBE.type) == ("http", "command")
    assert HTTP.accepts == COMMAND_PROBE.accepts == frozenset({"signing_key"})
    probe = http_probe("http://h:1/x")
    assert (probe.timeout_seconds, probe.field) == (5, "fingerprint")
    assert HTTP.build(HttpProbeConfig(type="http", url="http://h:1/x"), SERVICES).name == (
        "http:http://h:1/x"
    )
    for bad in ({"url": "h:1/x"}, {"url": "http://h/", "timeout_seconds": 0}):
        with pytest.raises(ValueError):
            HttpProbeConfig(type="http", **bad)
    with pytest.raises(ValueError):
        CommandProbeConfig(type="command", command=[])


@pytest.mark.anyio
async def test_http_probe_reports_the_key_the_holder_uses(tmp_path: Path, serve: Any) -> None:
    directory = tmp_path / "key"
    _, first = deployed(directory, 1)
    server = serve(Starlette(routes=starlette_routes(HeldKey(directory))))
    probe = http_probe(server.url + "/.well-known/keyturn-holder")
    assert await probe.fingerprint() == first
    _, second = deployed(directory, 2, "ecdsa-p256")
    assert second != first
    assert await probe.fingerprint() == second

    server.stop()
    with pytest.raises(KeyturnError) as info:
        await probe.fingerprint()
    message = str(info.value)
    assert message.startswith("probe api-holder: the holder at http://127.0.0.1:")
    assert "did not answer (ConnectError); check it is running" in message


def _nonsense(request: Request) -> Response:
    answers: dict[str, Response] = {
        "/bad-fingerprint": JSONResponse({"fingerprint": "not-a-fingerprint"}),
        "/no-field": JSONResponse({"key_id": "0123456789abcdef"}),
        "/list": JSONResponse(["0123456789abcdef"]),
        "/text": PlainTextResponse("0123456789abcdef"),
        "/down": JSONResponse({"error": "no key loaded: private_key.pem is missing"}, 503),
        "/custom": JSONResponse({"key": {"fp": "x"}, "kid": "0123456789ABCDEF"}),
    }
    return answers.get(request.url.path, PlainTextResponse("nope", 404))


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/bad-fingerprint", "answered no 'fingerprint' of 16 hex digits"),
        ("/no-field", "answered no 'fingerprint' of 16 hex digits"),
        ("/list", "did not answer a JSON object"),
        ("/text", "did not answer a JSON object"),
        ("/down", "answered 503 (no key loaded: private_key.pem is missing); check the holder"),
        ("/elsewhere", "answered 404; check the holder has loaded its key"),
    ],
)
async def test_http_probe_refuses_nonsense_naming_the_probe(
    serve: Any, path: str, problem: str
) -> None:
    server = serve(Starlette(routes=[Route("/{path:path}", _nonsense)]))
    with pytest.raises(KeyturnError) as info:
        await http_probe(server.url + path).fingerprint()
    message = str(info.value)
    assert message.startswith(f"probe api-holder: {server.url}{path} {problem}")
    assert "\n" not in message


@pytest.mark.anyio
async def test_http_probe_reads_the_configured_field(serve: Any) -> None:
    server = serve(Starlette(routes=[Route("/{path:path}", _nonsense)]))
    assert await http_probe(server.url + "/custom", field="kid").fingerprint() == (
        "0123456789abcdef"
    )


@pytest.mark.anyio
async def test_http_probe_times_out_on_a_holder_that_hangs() -> None:
    # A socket that accepts connections (the kernel's backlog) and never answers.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/h"
        started = time.monotonic()
        with pytest.raises(KeyturnError) as info:
            await http_probe(url, timeout_seconds=0.5).fingerprint()
        assert time.monotonic() - started < 5
    assert str(info.value).startswith(f"probe api-holder: the holder at {url} did not answer (")


FETCH = """
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
    fingerprint = json.load(response)["fingerprint"]
print(json.dumps({"fingerprint": fingerprint}) if sys.argv[2] == "json" else fingerprint)
"""


@pytest.mark.anyio
@pytest.mark.parametrize("form", ["json", "bare"])
async def test_command_probe_reports_what_the_program_prints(
    tmp_path: Path, serve: Any, form: str
) -> None:
    directory = tmp_path / "key"
    _, expected = deployed(directory, 1)
    server = serve(Starlette(routes=starlette_routes(HeldKey(directory))))
    url = server.url + "/.well-known/keyturn-holder"
    probe = command_probe([PY, "-c", FETCH, url, form])
    assert await probe.fingerprint() == expected

    server.stop()
    with pytest.raises(KeyturnError) as info:
        await probe.fingerprint()
    message = str(info.value)
    assert message.startswith(f"probe api-cmd: {PY} exited 1: ")
    assert "Connection refused" in message


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("program", "problem"),
    [
        ("print('hello')", "printed no fingerprint"),
        ("print('0123456789abcdef'); print('more')", "printed no fingerprint"),
        ("print('{\"fingerprint\": 42}')", "printed no fingerprint"),
        ("import sys; sys.exit('holder pod not found')", "exited 1: holder pod not found"),
        ("import time; time.sleep(30)", "timed out after 0.5 s"),
    ],
)
async def test_command_probe_refuses_nonsense_naming_the_probe(program: str, problem: str) -> None:
    timeout = 0.5 if "sleep" in program else 10
    probe = command_probe([PY, "-c", program], timeout_seconds=timeout)
    with pytest.raises(KeyturnError) as info:
        await probe.fingerprint()
    assert str(info.value).startswith(f"probe api-cmd: {PY} ")
    assert problem in str(info.value)
