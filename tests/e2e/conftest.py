"""Fixtures of the end-to-end tests; the harness itself is in harness.py."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet import PgCluster
from harness import LEASE_PATCH, Kt

from keyturn.adapters.secrets_file import WebhookSecretsFileTarget
from keyturn.receiver import ReceiverProcess, start_receiver
from keyturn.sandbox.testing import SandboxProcess, start_sandbox


@pytest.fixture
def make_kt(tmp_path: Path) -> Iterator[Callable[..., Kt]]:
    """``make_kt(db_url=None, *, receiver=False, **sandbox_kwargs)``: a sandbox and an
    initialised keyturn working directory (short lease, fast retries).

    With ``receiver=True`` the reference receiver runs too and sandbox-webhook points at it
    (``kt.receiver``; its record file is ``kt.receiver.record``). The receiver is started
    first, on a port it picks itself, reading a placeholder secrets file at the webhook's
    deploy path; `init` then points the webhook at it and deploys the real secret, which the
    receiver has loaded before this returns. No port is guessed, so parallel tests never race.
    """
    sandboxes: list[SandboxProcess] = []
    receivers: list[ReceiverProcess] = []

    def make(db_url: str | None = None, *, receiver: bool = False, **sandbox_kwargs: Any) -> Kt:
        sandbox = start_sandbox(tmp_path / f"sandbox-{len(sandboxes)}", **sandbox_kwargs)
        sandboxes.append(sandbox)
        kt = Kt(tmp_path / f"work-{len(sandboxes)}", sandbox, db_url)
        init = ["init", str(kt.workdir), "--sandbox-bootstrap", str(sandbox.bootstrap_path)]
        if receiver:
            target = WebhookSecretsFileTarget("placeholder", kt.secrets_file)
            target.deploy([f"whs-placeholder-{secrets.token_hex(8)}"])
            kt.receiver = start_receiver(
                kt.secrets_file, record=tmp_path / f"receiver-{len(sandboxes)}.jsonl"
            )
            receivers.append(kt.receiver)
            init += ["--receiver-url", kt.receiver.url]
        kt.run(*init)
        if kt.receiver is not None:
            deployed = WebhookSecretsFileTarget("deployed", kt.secrets_file)
            kt.receiver.wait_for_version(deployed.read_back()[0])
        else:
            kt.enable_webhooks()  # init leaves it disabled when no receiver answers
        # A short lease, so a worker killed here is taken over within seconds, and fast retries.
        for old, new in LEASE_PATCH:
            kt.patch_config(old, new)
        return kt

    yield make
    for s in sandboxes:
        s.stop()
    for r in receivers:
        r.close()


@pytest.fixture
def pg_cluster(tmp_path: Path) -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster of this test's own (it may be stopped and restarted)."""
    cluster = PgCluster(tmp_path).init()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def kt(make_kt: Callable[..., Kt]) -> Kt:
    return make_kt()
