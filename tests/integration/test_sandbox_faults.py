"""Fault injection, from flags and at run time, observed by real clients."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from keyturn.sandbox.testing import SandboxError, SandboxProcess


def new_pem() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cred_ids(sandbox: SandboxProcess) -> list[str]:
    response = sandbox.client().request("GET", "/auth/credentials")
    assert response.status_code == 200
    return [c["credentialId"] for c in response.json()["items"]]


def test_apply_then_fail_500_creates_the_credential(sandbox: SandboxProcess) -> None:
    sandbox.set_faults(
        apply_then_fail_rate=1.0, apply_then_fail_mode="500", paths=["POST /auth/credentials"]
    )
    response = sandbox.client().create_key_credential(new_pem(), "applied-500")
    assert response.status_code == 500
    assert response.json()["error"]["status"] == 500
    assert "applied-500" in cred_ids(sandbox)
    assert sandbox.state()["faults"]["apply_then_fail"] == 1


def test_apply_then_fail_drop_closes_the_connection(sandbox: SandboxProcess) -> None:
    sandbox.set_faults(
        apply_then_fail_rate=1.0, apply_then_fail_mode="drop", paths=["POST /auth/credentials"]
    )
    with pytest.raises(httpx.TransportError):
        sandbox.client().create_key_credential(new_pem(), "applied-drop")
    assert "applied-drop" in cred_ids(sandbox)
    state = sandbox.state()
    assert state["faults"]["apply_then_fail"] == 1
    # the sandbox is still healthy afterwards
    assert sandbox.client().request("GET", "/auth/credentials").status_code == 200


def test_error_and_429_faults_have_no_effect(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    for fields, status in (({"error_rate": 1.0}, 500), ({"rate_429": 1.0}, 429)):
        sandbox.set_faults(paths=["POST /auth/credentials"], **fields)
        # the user action is obtained first (those routes are not faulted), then the call fails
        response = client.create_key_credential(new_pem(), f"never-{status}")
        assert response.status_code == status
        assert response.json()["error"]["status"] == status
        sandbox.clear_faults()
        assert f"never-{status}" not in cred_ids(sandbox)
    state = sandbox.state()
    assert state["faults"]["error_500"] == 1
    assert state["faults"]["rate_429"] == 1
    assert state["requests"]["POST /auth/credentials"] == {"500": 1, "429": 1}


def test_hang_outlasts_the_client_timeout(sandbox: SandboxProcess) -> None:
    sandbox.set_faults(hang_rate=1.0, hang_seconds=1.5, paths=["GET /auth/credentials"])
    client = sandbox.client(timeout=0.5)
    started = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        client.request("GET", "/auth/credentials")
    assert time.monotonic() - started < 1.4
    # a patient client gets the 500 at the end of the hang
    patient = sandbox.client(timeout=5.0)
    response = patient.request("GET", "/auth/credentials")
    assert response.status_code == 500
    assert sandbox.state()["faults"]["hang"] == 2


def test_latency_is_added(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    sandbox.set_faults(latency_ms=300)
    started = time.monotonic()
    assert client.request("GET", "/auth/credentials").status_code == 200
    assert time.monotonic() - started >= 0.3
    # control routes are never faulted
    started = time.monotonic()
    sandbox.state()
    assert time.monotonic() - started < 0.3


def test_rate_limit_per_minute_per_org(sandbox: SandboxProcess) -> None:
    client = sandbox.client()
    sandbox.set_faults(rate_limit_per_minute=5)
    statuses = [client.request("GET", "/auth/credentials").status_code for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    assert sandbox.state()["faults"]["rate_limited"] == 2
    sandbox.set_faults(rate_limit_per_minute=0)
    assert client.request("GET", "/auth/credentials").status_code == 200


def test_faults_from_start_flags(sandbox_factory: object, tmp_path: Path) -> None:
    from collections.abc import Callable

    assert callable(sandbox_factory)
    factory: Callable[..., SandboxProcess] = sandbox_factory
    sandbox = factory(extra_args=["--error-rate", "1", "--fault-path", "GET /auth/credentials"])
    assert sandbox.faults()["error_rate"] == 1.0
    assert sandbox.client().request("GET", "/auth/credentials").status_code == 500
    assert (
        sandbox.client().request("POST", "/auth/credentials/init", {"kind": "Key"}).status_code
        == 200
    )


def test_bad_fault_settings_are_one_clear_line(sandbox: SandboxProcess, tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="error_rate must be a share between 0 and 1"):
        sandbox.set_faults(error_rate=2)
    with pytest.raises(SandboxError, match="unknown fault field 'eror_rate'"):
        sandbox.set_faults(eror_rate=0.1)
    with pytest.raises(SandboxError, match='apply_then_fail_mode must be "500" or "drop"'):
        sandbox.set_faults(apply_then_fail_mode="explode")
    assert sandbox.faults()["error_rate"] == 0.0
    result = subprocess.run(
        [sys.executable, "-m", "keyturn.sandbox", "serve", "--state-dir", str(tmp_path / "x"),
         "--rate-429", "1.5"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "keyturn: error: rate_429 must be a share between 0 and 1, got 1.5"
    )
