"""Run a user's program as a deploy target of signing keys, and reload hooks.

The program is started from an argument list (never a shell), in a new session so a timeout
can kill its whole process group, with a minimal environment inherited from keyturn's
(:data:`INHERITED_ENV`: no tokens, no key material). Key material reaches it on **stdin** only,
as one JSON document::

    {"phase": "stage" | "read_back" | "promote" | "rollback",
     "rotation_id": "...",      # null for read_back (it belongs to no rotation)
     "credential": "...",       # null for read_back
     "staged": false,           # read_back only: true asks for what stage wrote
     "material": {"private_key": "<PEM>", "credential_id": "...", "credential_uuid": "..."}}
                                # stage, promote, rollback only (keyturn.adapters.material)

Exit 0 is success. On read_back the program prints the key document it holds on stdout; on
the other phases it may print ``{"changed": false}`` when the content was already in place
(anything else counts as a change). A call must be idempotent per rotation and phase. Any other
exit, or a timeout, is a retryable :class:`StepError` with the last line of its stderr,
scrubbed of key material (:func:`scrub`); stdout never appears in an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from keyturn.adapters.material import material_document, material_from_document
from keyturn.domain.errors import KeyturnError, StepError
from keyturn.ports import DeployedMaterial

DEFAULT_TIMEOUT_SECONDS: Final = 30.0
#: The variables a program inherits from keyturn's environment (when set); nothing else.
INHERITED_ENV: Final = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "KUBECONFIG",
)
#: How much of a program's stdout is read (a key document is a few kB) and of its stderr kept.
STDOUT_LIMIT: Final = 1 << 20
STDERR_KEEP: Final = 64 << 10
#: The longest stderr line an error quotes.
MAX_QUOTE: Final = 200
#: After killing a process group, how long to wait for the program to be reaped.
_REAP_SECONDS: Final = 5.0

PHASES: Final = ("stage", "read_back", "promote", "rollback")

_PEM_BLOCK: Final = re.compile(
    r"-----BEGIN[^-\n]*-----.*?(?:-----END[^-\n]*-----|\Z)", re.DOTALL | re.IGNORECASE
)
_PEM_MARK: Final = re.compile(r"-----(?:BEGIN|END)[^\n]*", re.IGNORECASE)
_B64_RUN: Final = re.compile(r"[A-Za-z0-9+/=_-]{16,}")
_LOOKS_LIKE_KEY: Final = 40
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


# ------------------------------------------------------------------------------- scrubbing


def _normalised(secret: str) -> str:
    """A secret without whitespace, PEM armour or JSON-escaped newlines: its base64 body."""
    text = _PEM_MARK.sub("", secret.replace("\\n", "\n"))
    return "".join(text.split())


def _key_like(run: str) -> bool:
    return (
        len(run) >= _LOOKS_LIKE_KEY
        and any(c.isupper() for c in run)
        and any(c.islower() for c in run)
        and any(c.isdigit() for c in run)
    )


def scrub(text: str, secrets: Sequence[str] = (), *, limit: int = MAX_QUOTE) -> str:
    """`text` fit for an error or a log: PEM blocks (whole or cut off) removed, every run of
    base64-like characters that is part of one of `secrets` or looks like key material (40 or
    more characters mixing cases and digits) replaced, control characters dropped, at most
    `limit` characters."""
    text = _PEM_BLOCK.sub("[PEM removed]", text)
    text = _PEM_MARK.sub("[PEM removed]", text)
    bodies = [b for b in (_normalised(s) for s in secrets) if b]

    def redact(match: re.Match[str]) -> str:
        run = match.group(0)
        if _key_like(run) or any(run in body for body in bodies):
            return "[redacted]"
        return run

    text = _B64_RUN.sub(redact, text)
    for body in bodies:  # the whole secret, in case it is shorter than a run
        if len(body) >= 16:
            text = text.replace(body, "[redacted]")
    text = _CONTROL.sub(" ", text).strip()
    if len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


def last_line(stderr: bytes, secrets: Sequence[str] = ()) -> str:
    """The last non-empty line of a program's stderr, scrubbed (PEM blocks spanning lines are
    removed before the line is chosen); "(no stderr)" when there is none."""
    text = _PEM_BLOCK.sub("[PEM removed]", stderr.decode("utf-8", errors="replace"))
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "(no stderr)"
    return scrub(lines[-1], secrets) or "(no stderr)"


# --------------------------------------------------------------------------------- running


def minimal_env() -> dict[str, str]:
    """What a program inherits: :data:`INHERITED_ENV` from keyturn's environment, if set."""
    return {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}


@dataclass(frozen=True)
class Completed:
    """How a program ended: its exit code (negative: killed by that signal), or None when it
    timed out and its process group was killed; its stdout (at most :data:`STDOUT_LIMIT`
    bytes; `overflow` when it printed more) and the tail of its stderr."""

    code: int | None
    stdout: bytes
    stderr: bytes
    overflow: bool = False


def _kill_group(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


async def _feed(stream: asyncio.StreamWriter | None, data: bytes | None) -> None:
    if stream is None:
        return
    try:
        if data:
            stream.write(data)
            await stream.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the program does not read its stdin: its business
    finally:
        stream.close()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await stream.wait_closed()


async def _read(
    stream: asyncio.StreamReader | None, kept: bytearray, limit: int, *, tail: bool
) -> bool:
    """Read `stream` to its end into `kept`, keeping at most `limit` bytes (its head, or its
    tail: `kept` is usable when the read is cut short); whether more came."""
    overflow = False
    if stream is None:
        return overflow
    while chunk := await stream.read(65536):
        kept += chunk
        if len(kept) > limit:
            overflow = True
            if tail:
                del kept[: len(kept) - limit]
            else:
                del kept[limit:]
    return overflow


async def run_process(
    argv: Sequence[str], *, stdin: bytes | None, timeout_seconds: float
) -> Completed:
    """Run `argv` (no shell) with `stdin` (None: /dev/null) and :func:`minimal_env`, in its
    own process group; after `timeout_seconds` the whole group is killed (the result keeps
    what it wrote to stderr until then). OSError when it cannot be started. A cancelled call
    kills the group too."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=minimal_env(),
        start_new_session=True,
        close_fds=True,
    )
    stdout, stderr = bytearray(), bytearray()

    async def talk() -> bool:
        _fed, overflow, _ = await asyncio.gather(
            _feed(proc.stdin, stdin),
            _read(proc.stdout, stdout, STDOUT_LIMIT, tail=False),
            _read(proc.stderr, stderr, STDERR_KEEP, tail=True),
        )
        await proc.wait()
        return bool(overflow)

    try:
        overflow = await asyncio.wait_for(talk(), timeout_seconds)
    except TimeoutError:
        _kill_group(proc.pid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), _REAP_SECONDS)
        return Completed(None, b"", bytes(stderr))
    except BaseException:
        _kill_group(proc.pid)
        raise
    return Completed(proc.returncode, bytes(stdout), bytes(stderr), overflow)


def program_name(argv: Sequence[str]) -> str:
    return argv[0] if argv else "(no program)"


def how_it_ended(code: int | None, timeout_seconds: float) -> str:
    if code is None:
        return f"timed out after {timeout_seconds:g} s (its process group was killed)"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exited on signal {signal.Signals(-code).name}"
    return f"exited {code}"


def failure(
    who: str,
    argv: Sequence[str],
    done: Completed,
    timeout_seconds: float,
    secrets: Sequence[str] = (),
) -> StepError:
    """The retryable error of a program that did not exit 0: `who` (``target NAME``), the
    program, how it ended and the last line of its stderr, scrubbed."""
    line = last_line(done.stderr, secrets)
    return StepError(
        f"{who}: {program_name(argv)} {how_it_ended(done.code, timeout_seconds)}: {line}",
        retryable=True,
    )


async def _start(
    who: str, argv: Sequence[str], stdin: bytes | None, timeout_seconds: float
) -> Completed:
    try:
        return await run_process(argv, stdin=stdin, timeout_seconds=timeout_seconds)
    except OSError as exc:
        raise StepError(
            f"{who}: cannot start {program_name(argv)} ({exc.strerror or type(exc).__name__});"
            " check the command's path and permissions",
            retryable=True,
        ) from None


async def run_hook(argv: Sequence[str], timeout_seconds: float, *, who: str = "hook") -> None:
    """Run a hook (e.g. ``["systemctl", "reload", "app"]``): no stdin, the minimal environment,
    the process group killed after `timeout_seconds`. StepError(retryable) naming `who` unless it
    exits 0."""
    done = await _start(who, argv, None, timeout_seconds)
    if done.code != 0:
        raise failure(who, argv, done, timeout_seconds)


# ------------------------------------------------------------------------------ the target


def _changed(stdout: bytes) -> bool:
    """False only when the program printed ``{"changed": false}``."""
    try:
        document: Any = json.loads(stdout)
    except (UnicodeDecodeError, ValueError):
        return True
    return not (isinstance(document, dict) and document.get("changed") is False)


class CommandProgram:
    """The program behind a ``command`` deploy target: one call per phase, the document on its
    stdin (see the module docstring). It keeps no state: whether a call changed anything is
    what the program says. When `reload_command` is set, it runs after a promote or rollback
    that changed something, and only then."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        reload_command: Sequence[str] | None = None,
    ) -> None:
        if not argv:
            raise KeyturnError(f"target {name}: the command is empty; name a program to run")
        self.name = name
        self.argv = tuple(argv)
        self.timeout = timeout_seconds
        self.reload_command = tuple(reload_command) if reload_command else None

    def __repr__(self) -> str:
        return f"CommandProgram(name={self.name!r}, program={self.argv[0]!r})"

    @property
    def _who(self) -> str:
        return f"target {self.name}"

    async def _call(self, document: dict[str, Any], secrets: Sequence[str]) -> Completed:
        stdin = json.dumps(document, separators=(",", ":")).encode()
        done = await _start(self._who, self.argv, stdin, self.timeout)
        if done.code != 0:
            raise failure(self._who, self.argv, done, self.timeout, secrets)
        return done

    async def write(
        self, phase: str, material: DeployedMaterial, *, rotation_id: str, credential: str
    ) -> dict[str, Any]:
        """stage, promote or rollback `material`; the detail ``{"changed": bool}``."""
        if phase not in ("stage", "promote", "rollback"):
            raise KeyturnError(f"{self._who}: unknown phase {phase!r}")
        if not isinstance(material, DeployedMaterial):
            raise StepError(
                f"{self._who}: {phase} needs signing-key material, not {type(material).__name__}",
                retryable=False,
            )
        document = {
            "phase": phase,
            "rotation_id": rotation_id,
            "credential": credential,
            "material": material_document(material),
        }
        secrets = [material.private_key_pem.decode("ascii", errors="replace")]
        done = await self._call(document, secrets)
        changed = _changed(done.stdout)
        if changed and phase != "stage" and self.reload_command is not None:
            await run_hook(self.reload_command, self.timeout, who=f"{self._who} reload_command")
        return {"changed": changed}

    async def read_back(self, *, staged: bool = False) -> DeployedMaterial:
        """The key document the program prints for read_back (`staged`: what stage wrote)."""
        document = {"phase": "read_back", "rotation_id": None, "credential": None, "staged": staged}
        done = await self._call(document, ())
        where = f"{self._who}: what {program_name(self.argv)} printed for read_back"
        if done.overflow:
            raise StepError(
                f"{where} is over {STDOUT_LIMIT} bytes; print the key document only", retryable=True
            )
        if not done.stdout.strip():
            raise StepError(
                f"{where} is empty; print the key document the target holds", retryable=True
            )
        try:
            return material_from_document(done.stdout, where)
        except KeyturnError as exc:
            raise StepError(str(exc), retryable=True) from None
