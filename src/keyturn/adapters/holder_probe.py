"""Probes asking a holder of a signing key which key it uses now, as keyturn's fingerprint of
its public key (16 hex digits; see :func:`keyturn.holders.key_fingerprint`).

- :class:`HttpHolderProbe`: GET a URL answering JSON with the fingerprint in a field
  (``fingerprint`` by default: the route :func:`keyturn.holders.starlette_routes` serves);
- :class:`CommandHolderProbe`: run a program (no shell, no stdin, the minimal environment of
  :mod:`keyturn.adapters.command`) that prints ``{"fingerprint": "..."}`` or the bare
  fingerprint on one line.

Both raise :class:`KeyturnError` naming the probe (``probe NAME: ...``, one line: what is wrong
and what to check) when the holder is down or answers something else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Final

import httpx

from keyturn.adapters.command import how_it_ended, last_line, program_name, run_process, scrub
from keyturn.domain.errors import KeyturnError

DEFAULT_HTTP_TIMEOUT: Final = 5.0
DEFAULT_COMMAND_TIMEOUT: Final = 10.0
_FINGERPRINT: Final = re.compile(r"[0-9a-fA-F]{16}")


def parse_fingerprint(value: Any) -> str | None:
    """`value` as a fingerprint (lower case), or None when it is not one."""
    if isinstance(value, str) and _FINGERPRINT.fullmatch(value.strip()):
        return value.strip().lower()
    return None


class HttpHolderProbe:
    """A KeyProbe over HTTP: GET `url`, the fingerprint in the JSON answer's `field`."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout_seconds: float = DEFAULT_HTTP_TIMEOUT,
        field: str = "fingerprint",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.timeout_seconds = timeout_seconds
        self.field = field
        self._transport = transport

    def __repr__(self) -> str:
        return f"HttpHolderProbe(name={self.name!r}, url={self.url!r})"

    def _error(self, problem: str) -> KeyturnError:
        return KeyturnError(f"probe {self.name}: {problem}")

    async def fingerprint(self) -> str:
        try:
            async with httpx.AsyncClient(
                timeout=self.timeout_seconds, transport=self._transport, follow_redirects=False
            ) as client:
                response = await client.get(self.url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise self._error(
                f"the holder at {self.url} did not answer ({type(exc).__name__}); check it is"
                " running and the URL is right"
            ) from None
        return self._read(response)

    def _read(self, response: httpx.Response) -> str:
        try:
            document = response.json()
        except ValueError:
            document = None
        if response.status_code != 200:
            said = ""
            if isinstance(document, dict) and isinstance(document.get("error"), str):
                said = f" ({scrub(document['error'], limit=120)})"
            raise self._error(
                f"{self.url} answered {response.status_code}{said}; check the holder has loaded"
                " its key and the URL is its holder route"
            )
        if not isinstance(document, dict):
            raise self._error(
                f"{self.url} did not answer a JSON object; check the URL is the holder route"
            )
        found = parse_fingerprint(document.get(self.field))
        if found is None:
            raise self._error(
                f"{self.url} answered no {self.field!r} of 16 hex digits; check the URL and"
                " the probe's field"
            )
        return found


def _fingerprint_in(stdout: bytes) -> str | None:
    text = stdout.decode("utf-8", errors="replace").strip()
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict):
        return parse_fingerprint(document.get("fingerprint"))
    lines = text.splitlines()
    return parse_fingerprint(lines[0]) if len(lines) == 1 else None


class CommandHolderProbe:
    """A KeyProbe running a program that prints the holder's fingerprint."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        timeout_seconds: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        if not argv:
            raise KeyturnError(f"probe {name}: the command is empty; name a program to run")
        self.name = name
        self.argv = tuple(argv)
        self.timeout_seconds = timeout_seconds

    def __repr__(self) -> str:
        return f"CommandHolderProbe(name={self.name!r}, program={self.argv[0]!r})"

    def _error(self, problem: str) -> KeyturnError:
        return KeyturnError(f"probe {self.name}: {problem}")

    async def fingerprint(self) -> str:
        program = program_name(self.argv)
        try:
            done = await run_process(self.argv, stdin=None, timeout_seconds=self.timeout_seconds)
        except OSError as exc:
            raise self._error(
                f"cannot start {program} ({exc.strerror or type(exc).__name__}); check the"
                " command's path and permissions"
            ) from None
        if done.code != 0:
            ended = how_it_ended(done.code, self.timeout_seconds)
            raise self._error(f"{program} {ended}: {last_line(done.stderr)}")
        found = None if done.overflow else _fingerprint_in(done.stdout)
        if found is None:
            raise self._error(
                f'{program} printed no fingerprint; it must print {{"fingerprint": "<16 hex>"}}'
                " or the 16 hex digits alone"
            )
        return found
