"""keyturn.holders: the fingerprint a holder reports is keyturn's; HeldKey follows the files a
file target replaces (also a symlinked directory swapped at once); status never holds the key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from keyturn.adapters.deploy import FileTarget
from keyturn.adapters.keys import ALGORITHMS, CryptoKeys
from keyturn.holders import (
    HeldKey,
    HolderError,
    fingerprint_of_private,
    key_fingerprint,
    starlette_routes,
)
from keyturn.kinds.signing_key import fingerprint
from keyturn.ports import DeployedMaterial
from keyturn.testing.secret_scan import scan_bytes

KEYS = CryptoKeys()


def material(n: int, algorithm: str = "ed25519") -> DeployedMaterial:
    return DeployedMaterial(KEYS.generate(algorithm).private_pem, f"Y3JlZC0{n}", f"cr-{n:04d}")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fingerprints_agree_with_the_signing_key_kind(algorithm: str) -> None:
    generated = KEYS.generate(algorithm)
    expected = fingerprint(generated.public_pem)
    assert len(expected) == 16 and int(expected, 16) >= 0
    assert key_fingerprint(generated.public_pem) == expected
    assert fingerprint_of_private(generated.private_pem) == expected
    # whitespace is not part of the key: CRLF line ends, indentation, no trailing newline
    variant = "  " + generated.public_pem.replace("\n", "\r\n").strip()
    assert key_fingerprint(variant) == expected == fingerprint(variant)
    assert key_fingerprint(KEYS.generate(algorithm).public_pem) != expected


def test_held_key_loads_the_key_and_its_credential_id(tmp_path: Path) -> None:
    key = material(1)
    FileTarget("t", tmp_path / "key").deploy(key)
    held = HeldKey(tmp_path / "key")
    loaded = held.current()
    assert loaded.private_key_pem == key.private_key_pem
    assert (loaded.credential_id, loaded.credential_uuid) == ("Y3JlZC01", "cr-0001")
    assert loaded.fingerprint == fingerprint_of_private(key.private_key_pem)
    assert "PRIVATE" not in repr(loaded)
    assert held.current() is loaded  # unchanged files are not read again


def test_held_key_reloads_after_the_files_change(tmp_path: Path) -> None:
    directory = tmp_path / "key"
    target = FileTarget("t", directory)
    old, new = material(1), material(2, "ecdsa-p256")
    target.deploy(old)
    held = HeldKey(directory)
    first = held.current()
    target.deploy(new)
    second = held.current()
    assert second.fingerprint == fingerprint_of_private(new.private_key_pem) != first.fingerprint
    assert second.credential_id == new.credential_id
    assert second.loaded_at >= first.loaded_at
    # the same content written again in place (same inode, new mtime) is loaded again too
    os.utime(directory / "credential.json", ns=(1, 1))
    assert held.current() is not second


def test_check_every_limits_how_often_the_files_are_looked_at(tmp_path: Path) -> None:
    directory = tmp_path / "key"
    target = FileTarget("t", directory)
    target.deploy(material(1))
    clock = Clock()
    held = HeldKey(directory, check_every=5, clock=clock)
    old = held.current().fingerprint
    new = material(2)
    target.deploy(new)
    clock.now += 4
    assert held.current().fingerprint == old
    clock.now += 1
    assert held.current().fingerprint == fingerprint_of_private(new.private_key_pem)


def test_a_broken_replacement_keeps_the_loaded_key_until_it_is_fixed(tmp_path: Path) -> None:
    directory = tmp_path / "key"
    target = FileTarget("t", directory)
    target.deploy(material(1))
    held = HeldKey(directory)
    old = held.current()
    (directory / "private_key.pem").write_text("-----BEGIN PRIVATE KEY-----\nZ2FyYmFnZQ\n")
    assert held.current() is old
    assert held.last_load_error is not None
    assert "private_key.pem" in held.last_load_error
    assert "Z2FyYmFnZQ" not in held.last_load_error
    (directory / "credential.json").write_text('{"credentialId": "x"}')
    new = material(2)
    target.deploy(new)
    assert held.current().credential_id == new.credential_id
    assert held.last_load_error is None


def test_no_key_is_a_holder_error(tmp_path: Path) -> None:
    held = HeldKey(tmp_path / "missing")
    with pytest.raises(HolderError, match=r"private_key\.pem"):
        held.current()
    with pytest.raises(HolderError):
        held.status()


def test_a_symlinked_directory_swapped_at_once_is_read_from_one_version(tmp_path: Path) -> None:
    # The layout of a Kubernetes secret volume: files -> ..data/file, ..data -> a version dir.
    mount = tmp_path / "mount"
    mount.mkdir()
    old, new = material(1), material(2)
    FileTarget("v1", mount / "v1").deploy(old)
    FileTarget("v2", mount / "v2").deploy(new)
    (mount / "..data").symlink_to("v1")
    for name in ("private_key.pem", "credential.json"):
        (mount / name).symlink_to(f"..data/{name}")
    held = HeldKey(mount)
    assert held.current().credential_id == old.credential_id
    (mount / "..data_tmp").symlink_to("v2")
    (mount / "..data_tmp").replace(mount / "..data")
    loaded = held.current()
    assert (loaded.credential_id, loaded.fingerprint) == (
        new.credential_id,
        fingerprint_of_private(new.private_key_pem),
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://holder")


@pytest.mark.anyio
async def test_status_and_the_route_never_hold_the_key(tmp_path: Path) -> None:
    key = material(1, "rsa-2048")
    FileTarget("t", tmp_path / "key").deploy(key)
    held = HeldKey(tmp_path / "key")
    status = held.status()
    assert set(status) == {"fingerprint", "credential_id", "loaded_at"}
    assert status["fingerprint"] == fingerprint_of_private(key.private_key_pem)
    assert status["credential_id"] == key.credential_id
    assert status["loaded_at"].endswith("Z")
    assert scan_bytes(json.dumps(status), {"key": key.private_key_pem}) == []

    app = Starlette(routes=starlette_routes(held, extra=lambda: {"last_error": None}))
    async with _client(app) as client:
        response = await client.get("/.well-known/keyturn-holder")
        assert response.status_code == 200
        assert response.json() == {**status, "last_error": None}
        assert scan_bytes(response.content, {"key": key.private_key_pem}) == []
        assert (await client.post("/.well-known/keyturn-holder")).status_code == 405

    empty = Starlette(routes=starlette_routes(HeldKey(tmp_path / "none"), path="/holder"))
    async with _client(empty) as client:
        response = await client.get("/holder")
        assert response.status_code == 503
        assert "private_key.pem" in response.json()["error"]
