"""The ``command`` deploy target: the user's program gets the key document on stdin, one call
per phase; its stdout is the read-back and the change flag; its failures are retryable errors
quoting its last stderr line without key material; a timeout kills its process group; the
reload hook runs only after a promote or rollback that changed something; nothing secret goes
in argv or the environment."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pydantic
import pytest
from fakes import FakeServices

from keyturn.adapters.command import INHERITED_ENV, run_hook, scrub
from keyturn.adapters.keys import CryptoKeys
from keyturn.domain.errors import StepError
from keyturn.engine.spi import TargetOp
from keyturn.ports import DeployedMaterial
from keyturn.targets.command import COMMAND, CommandConfig, CommandTarget
from keyturn.testing.secret_scan import scan_bytes

KEYS = CryptoKeys()
PY = sys.executable


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def material(n: int, algorithm: str = "ed25519") -> DeployedMaterial:
    return DeployedMaterial(KEYS.generate(algorithm).private_pem, f"Y3JlZC0{n}", f"cr-{n:04d}")


def op(phase: str, rotation: str = "rot-1") -> TargetOp:
    return TargetOp(rotation_id=rotation, credential="api", phase=phase)


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def target(argv: list[str], **options: Any) -> CommandTarget:
    config = CommandConfig(type="command", name="t", command=argv, **options)
    built = COMMAND.build(config, FakeServices())
    assert isinstance(built, CommandTarget)
    return built


#: An idempotent program keeping a staged and a live copy in its state directory (argv[1]):
#: it logs every stdin document, its argv and environment, and says when nothing changed.
STORE = """
    import json, os, sys
    state = sys.argv[1]
    doc = json.load(sys.stdin)
    with open(os.path.join(state, "calls.jsonl"), "a") as log:
        log.write(json.dumps(doc) + "\\n")
    with open(os.path.join(state, "process.json"), "w") as out:
        json.dump({"argv": sys.argv, "env": dict(os.environ)}, out)

    def path(name):
        return os.path.join(state, name + ".json")

    def put(name, content):
        try:
            with open(path(name)) as f:
                if json.load(f) == content:
                    return False
        except FileNotFoundError:
            pass
        with open(path(name), "w") as f:
            json.dump(content, f)
        return True

    phase = doc["phase"]
    if phase == "read_back":
        which = "staged" if doc["staged"] else "live"
        if not os.path.exists(path(which)):
            sys.exit("nothing " + which + " yet")
        with open(path(which)) as f:
            print(f.read())
        sys.exit(0)
    if phase == "promote":
        with open(path("staged")) as f:
            if json.load(f) != doc["material"]:
                sys.exit("promote: the staged key is not the one to promote")
    changed = put("staged" if phase == "stage" else "live", doc["material"])
    print(json.dumps({"changed": changed}))
"""

RELOAD = """
    import sys
    with open(sys.argv[1], "a") as log:
        log.write("reloaded\\n")
"""


def calls(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]


def reloads(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


# ------------------------------------------------------------------------------- the protocol


def test_the_plugin_declares_itself() -> None:
    assert COMMAND.type == "command"
    assert COMMAND.accepts == frozenset({"signing_key"})
    built = COMMAND.build(CommandConfig(type="command", command=["/bin/deploy"]), FakeServices())
    assert built.name == "command:/bin/deploy"
    assert CommandConfig(type="command", command=["x"]).timeout_seconds == 30


@pytest.mark.parametrize(
    "bad",
    [
        {"command": []},
        {"command": [""]},
        {"command": ["x"], "timeout_seconds": 0},
        {"command": ["x"], "reload_command": []},
        {"command": ["x"], "shell": True},
    ],
)
def test_bad_configuration_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        CommandConfig(type="command", **bad)


@pytest.mark.anyio
async def test_each_phase_sends_its_document_on_stdin_and_read_back_parses_stdout(
    tmp_path: Path,
) -> None:
    program = script(tmp_path, "store.py", STORE)
    state = tmp_path / "state"
    state.mkdir()
    t = target([PY, str(program), str(state)])
    new = material(2)

    assert await t.stage(new, op("stage")) == {"changed": True}
    assert await t.read_back(staged=True) == new
    assert await t.promote(new, op("promote")) == {"changed": True}
    assert await t.read_back() == new

    document = {
        "private_key": new.private_key_pem.decode(),
        "credential_id": new.credential_id,
        "credential_uuid": new.credential_uuid,
    }
    assert calls(state) == [
        {"phase": "stage", "rotation_id": "rot-1", "credential": "api", "material": document},
        {"phase": "read_back", "rotation_id": None, "credential": None, "staged": True},
        {"phase": "promote", "rotation_id": "rot-1", "credential": "api", "material": document},
        {"phase": "read_back", "rotation_id": None, "credential": None, "staged": False},
    ]


@pytest.mark.anyio
async def test_changed_is_what_the_program_prints(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    idempotent = target([PY, str(script(tmp_path, "store.py", STORE)), str(state)])
    key = material(1)
    assert await idempotent.stage(key, op("stage")) == {"changed": True}
    assert await idempotent.stage(key, op("stage")) == {"changed": False}
    # A program that prints nothing (or anything but {"changed": false}) changed something.
    silent = target([PY, "-c", "import sys; sys.stdin.read()"])
    assert await silent.stage(key, op("stage")) == {"changed": True}
    chatty = target([PY, "-c", "import sys; sys.stdin.read(); print('wrote it')"])
    assert await chatty.promote(key, op("promote")) == {"changed": True}


@pytest.mark.anyio
async def test_no_material_in_argv_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYTURN_TEST_TOKEN", "dfns-token-that-must-not-leak")
    program = script(tmp_path, "store.py", STORE)
    state = tmp_path / "state"
    state.mkdir()
    t = target([PY, str(program), str(state)])
    key = material(1, "rsa-2048")
    await t.stage(key, op("stage"))
    seen = json.loads((state / "process.json").read_text())
    assert seen["argv"] == [str(program), str(state)]
    # Only the allow-listed variables reach the program (python may add its own few).
    inherited = {k for k in seen["env"] if not k.startswith(("PYTHON", "LC_", "__"))}
    assert inherited <= set(INHERITED_ENV)
    assert "KEYTURN_TEST_TOKEN" not in seen["env"]
    assert seen["env"].get("PATH") == os.environ.get("PATH")
    process = json.dumps(seen).encode()
    assert scan_bytes(process, {"key": key.private_key_pem}) == []
    assert b"dfns-token-that-must-not-leak" not in process
    # ...while the document on stdin did carry it (the scan would have seen it there).
    assert scan_bytes((state / "calls.jsonl").read_bytes(), {"key": key.private_key_pem})


# ------------------------------------------------------------------------------------ errors


ECHO_THEN_FAIL = """
    import json, sys
    data = sys.stdin.read()
    doc = json.loads(data)
    pem = doc["material"]["private_key"]
    sys.stderr.write("got " + data + "\\n")              # the raw document: escaped PEM
    sys.stderr.write(pem)                               # the PEM itself, over lines
    sys.stderr.write(json.dumps(doc, indent=2) + "\\n")  # pretty-printed
    body = pem.splitlines()[1]
    last = {
        "plain": "kubectl: the server is unreachable",
        "document": data,
        "pem": pem,
        "cut-pem": "\\n".join(pem.splitlines()[:-1]),
        "fragment": "bad key near " + body[8:40] + " in input",
    }[sys.argv[1]]
    sys.stderr.write(last + "\\n")
    sys.exit(3)
"""


@pytest.mark.anyio
@pytest.mark.parametrize("last", ["plain", "document", "pem", "cut-pem", "fragment"])
async def test_a_failure_is_retryable_and_quotes_the_last_stderr_line_without_key_material(
    tmp_path: Path, last: str
) -> None:
    program = script(tmp_path, "fail.py", ECHO_THEN_FAIL)
    t = target([PY, str(program), last])
    key = material(1, "ecdsa-p256")
    with pytest.raises(StepError) as info:
        await t.stage(key, op("stage"))
    message = str(info.value)
    assert info.value.retryable is True
    assert message.startswith(f"target t: {PY} exited 3: ")
    if last == "plain":
        assert message == f"target t: {PY} exited 3: kubectl: the server is unreachable"
    if last == "fragment":
        assert message.startswith(f"target t: {PY} exited 3: bad key near ")
        assert message.endswith(" in input")
    assert "PRIVATE KEY" not in message
    assert scan_bytes(message, {"key": key.private_key_pem}) == []
    body = key.private_key_pem.decode().splitlines()[1]
    assert body[8:40] not in message
    assert len(message) < 300
    assert "\n" not in message


@pytest.mark.anyio
async def test_exit_without_stderr_and_exit_on_a_signal(tmp_path: Path) -> None:
    with pytest.raises(StepError) as info:
        await target([PY, "-c", "import sys; sys.exit(7)"]).promote(material(1), op("promote"))
    assert str(info.value) == f"target t: {PY} exited 7: (no stderr)"
    killer = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    with pytest.raises(StepError) as info:
        await target([PY, "-c", killer]).promote(material(1), op("promote"))
    assert str(info.value) == f"target t: {PY} exited on signal SIGTERM: (no stderr)"


@pytest.mark.anyio
async def test_a_program_that_cannot_start_is_a_retryable_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-program")
    with pytest.raises(StepError) as info:
        await target([missing]).stage(material(1), op("stage"))
    assert info.value.retryable is True
    assert str(info.value).startswith(f"target t: cannot start {missing} (")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("printed", "problem"),
    [
        ("", "is empty"),
        ("not json at all", "is not keyturn's JSON key document"),
        ('{"private_key": "x"}', "lacks credential_id, credential_uuid"),
        ("PEM", "is not keyturn's JSON key document"),
    ],
)
async def test_read_back_of_nonsense_is_a_retryable_error_not_quoting_stdout(
    tmp_path: Path, printed: str, problem: str
) -> None:
    key = material(1)
    out = tmp_path / "out.txt"
    out.write_bytes(key.private_key_pem if printed == "PEM" else printed.encode())
    program = f"import sys; sys.stdout.write(open({str(out)!r}).read())"
    with pytest.raises(StepError) as info:
        await target([PY, "-c", program]).read_back()
    message = str(info.value)
    assert info.value.retryable is True
    assert message.startswith(f"target t: what {PY} printed for read_back ")
    assert problem in message
    assert "not json" not in message
    assert scan_bytes(message, {"key": key.private_key_pem}) == []


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(*pids: int, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


SLOW = """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(sys.argv[1], "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    sys.stderr.write("still waiting for the cluster\\n")
    sys.stderr.flush()
    time.sleep(60)
"""


@pytest.mark.anyio
async def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    t = target([PY, str(script(tmp_path, "slow.py", SLOW)), str(pids)], timeout_seconds=2)
    started = time.monotonic()
    with pytest.raises(StepError) as info:
        await t.stage(material(1), op("stage"))
    elapsed = time.monotonic() - started
    assert info.value.retryable is True
    assert str(info.value) == (
        f"target t: {PY} timed out after 2 s (its process group was killed):"
        " still waiting for the cluster"
    )
    assert 1.9 <= elapsed < 6
    assert pids.exists(), "the program did not get to start its child within the timeout"
    program, child = (int(p) for p in pids.read_text().split())
    _wait_gone(program, child)
    assert not _alive(program)
    assert not _alive(child), "the program's child survived the timeout"


@pytest.mark.anyio
async def test_a_cancelled_call_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    t = target([PY, str(script(tmp_path, "slow.py", SLOW)), str(pids)], timeout_seconds=60)
    call = asyncio.ensure_future(t.promote(material(1), op("promote")))
    for _ in range(200):
        if pids.exists() and pids.read_text():
            break
        await asyncio.sleep(0.05)
    assert pids.exists(), "the program did not start its child"
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    program, child = (int(p) for p in pids.read_text().split())
    _wait_gone(program, child)
    assert not _alive(program) and not _alive(child)


# ------------------------------------------------------------------------------ reload hook


@pytest.mark.anyio
async def test_the_reload_hook_runs_only_after_a_promote_or_rollback_that_changed(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    log = tmp_path / "reloads.log"
    t = target(
        [PY, str(script(tmp_path, "store.py", STORE)), str(state)],
        reload_command=[PY, str(script(tmp_path, "reload.py", RELOAD)), str(log)],
    )
    old, new = material(1), material(2)
    await t.stage(new, op("stage"))
    assert reloads(log) == 0  # staging is invisible to holders
    assert await t.promote(new, op("promote")) == {"changed": True}
    assert reloads(log) == 1
    assert await t.promote(new, op("promote")) == {"changed": False}
    assert reloads(log) == 1
    assert await t.rollback(old, op("rollback")) == {"changed": True}
    assert reloads(log) == 2
    assert await t.rollback(old, op("rollback")) == {"changed": False}
    assert reloads(log) == 2
    assert await t.read_back() == old
    assert reloads(log) == 2


@pytest.mark.anyio
async def test_a_failing_reload_hook_is_a_retryable_error_naming_it(tmp_path: Path) -> None:
    failing = [PY, "-c", "import sys; sys.exit('Unit app.service not loaded.')"]
    t = target([PY, "-c", "import sys; sys.stdin.read()"], reload_command=failing)
    with pytest.raises(StepError) as info:
        await t.promote(material(1), op("promote"))
    assert info.value.retryable is True
    assert str(info.value) == (
        f"target t reload_command: {PY} exited 1: Unit app.service not loaded."
    )


@pytest.mark.anyio
async def test_run_hook(tmp_path: Path) -> None:
    log = tmp_path / "reloads.log"
    await run_hook([PY, str(script(tmp_path, "reload.py", RELOAD)), str(log)], 10)
    assert reloads(log) == 1
    with pytest.raises(StepError) as info:
        await run_hook([PY, "-c", "import sys; sys.exit(5)"], 10, who="hook app")
    assert str(info.value) == f"hook app: {PY} exited 5: (no stderr)"
    started = time.monotonic()
    with pytest.raises(StepError) as info:
        await run_hook([PY, "-c", "import time; time.sleep(30)"], 0.5)
    assert "timed out after 0.5 s" in str(info.value)
    assert time.monotonic() - started < 5


def test_scrub_keeps_ordinary_words_and_caps_the_length() -> None:
    assert scrub("error: connection refused to 10.0.0.1:6443") == (
        "error: connection refused to 10.0.0.1:6443"
    )
    assert scrub("x" * 500).endswith("...")
    assert len(scrub("word " * 100)) <= 200
    assert scrub("a\x1b[31mred\x00") == "a [31mred"
