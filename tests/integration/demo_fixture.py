"""The holder demo service (``python -m keyturn.holders_demo``) as a subprocess for tests:
``start_demo(*args)`` starts one (stopped at the end), ``Demo.wait_for_url`` reads the URL it
prints, ``Demo.status`` / ``Demo.wait_for`` read its holder JSON."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest


class Demo:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.url = ""

    def wait_for_url(self, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            first = self.log.read_text().partition("\n")[0]
            if first.startswith("holder demo listening on "):
                self.url = first.removeprefix("holder demo listening on ")
                return self.url
            assert self.proc.poll() is None, f"the demo exited: {self.log.read_text()}"
            time.sleep(0.05)
        raise AssertionError(f"the demo printed no URL: {self.log.read_text()}")

    def status(self) -> dict[str, Any] | None:
        try:
            response = httpx.get(self.url, timeout=2)
        except httpx.HTTPError:
            return None
        return dict(response.json()) if response.status_code == 200 else None

    def wait_for(
        self, what: str, check: Callable[[dict[str, Any]], bool], timeout: float = 15
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = self.status()
            if status is not None and check(status):
                return status
            assert self.proc.poll() is None, f"the demo exited: {self.log.read_text()}"
            time.sleep(0.1)
        raise AssertionError(f"{what}: the demo's last status was {status}")


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Callable[..., Demo]]:
    started: list[Demo] = []

    def start(*args: str) -> Demo:
        log = tmp_path / f"demo-{len(started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "keyturn.holders_demo", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started.append(Demo(proc, log))
        return started[-1]

    yield start
    for demo in started:
        if demo.proc.poll() is None:
            demo.proc.terminate()
            try:
                demo.proc.wait(10)
            except subprocess.TimeoutExpired:
                demo.proc.kill()
                demo.proc.wait()
