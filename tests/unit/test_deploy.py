"""FileTarget: atomic, durable, 0600 files in a 0700 directory; read back; clear errors."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyturn.adapters.deploy import FileTarget
from keyturn.adapters.keys import CryptoKeys
from keyturn.domain.errors import KeyturnError
from keyturn.ports import DeployedMaterial
from keyturn.testing.secret_scan import scan_bytes

KEYS = CryptoKeys()


def _material(n: int = 1) -> DeployedMaterial:
    return DeployedMaterial(
        private_key_pem=KEYS.generate("ed25519").private_pem,
        credential_id=f"Y3JlZC1pZC0{n}",
        credential_uuid=f"cr-{n:04d}",
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0)  # the worst case: files and directories would be world-writable
    try:
        yield
    finally:
        os.umask(old)


def test_deploy_writes_both_files_with_tight_modes(tmp_path: Path, loose_umask: None) -> None:
    directory = tmp_path / "holders" / "api-server"
    target = FileTarget("api-server", directory)
    material = _material()
    target.deploy(material)
    assert _mode(directory) == 0o700
    key_file, cred_file = directory / "private_key.pem", directory / "credential.json"
    assert _mode(key_file) == 0o600
    assert _mode(cred_file) == 0o600
    assert key_file.read_bytes() == material.private_key_pem
    assert json.loads(cred_file.read_text()) == {
        "credentialId": material.credential_id,
        "credentialUuid": material.credential_uuid,
    }
    assert sorted(p.name for p in directory.iterdir()) == ["credential.json", "private_key.pem"]
    assert target.read_back() == material
    assert target.name == "api-server"


def test_deploy_is_idempotent_and_replaces_atomically(tmp_path: Path) -> None:
    target = FileTarget("t", tmp_path / "d")
    first, second = _material(1), _material(2)
    target.deploy(first)
    inode = (tmp_path / "d" / "private_key.pem").stat().st_ino
    target.deploy(first)  # same material: nothing to do
    assert (tmp_path / "d" / "private_key.pem").stat().st_ino == inode
    assert target.read_back() == first
    target.deploy(second)  # new material: a new file renamed over the old one
    assert (tmp_path / "d" / "private_key.pem").stat().st_ino != inode
    assert target.read_back() == second
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "credential.json",
        "private_key.pem",
    ]


def test_existing_file_with_loose_mode_is_rewritten_0600(tmp_path: Path) -> None:
    target = FileTarget("t", tmp_path)
    material = _material()
    target.deploy(material)
    (tmp_path / "private_key.pem").chmod(0o644)
    target.deploy(material)
    assert _mode(tmp_path / "private_key.pem") == 0o600


def test_a_reader_never_sees_a_partial_key(tmp_path: Path) -> None:
    """Deploy two keys alternately while a reader loops: it only ever sees a whole key."""
    target = FileTarget("t", tmp_path)
    materials = [_material(1), _material(2)]
    # Pad one key so the two differ in length (a torn write would show a mixed length).
    materials[1] = DeployedMaterial(
        private_key_pem=materials[1].private_key_pem + b"\n" * 4096,
        credential_id=materials[1].credential_id,
        credential_uuid=materials[1].credential_uuid,
    )
    target.deploy(materials[0])
    allowed = {m.private_key_pem for m in materials}
    seen: set[bytes] = set()
    stop = threading.Event()
    bad: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            data = (tmp_path / "private_key.pem").read_bytes()
            if data in allowed:
                seen.add(data)
            else:
                bad.append(len(data))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(300):
            target.deploy(materials[i % 2])
    finally:
        stop.set()
        thread.join()
    assert bad == []
    assert len(seen) == 2


def test_a_failed_replace_leaves_the_old_file_and_no_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = FileTarget("t", tmp_path)
    old = _material(1)
    target.deploy(old)

    def broken_replace(self: Path, other: Path) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", broken_replace)
    with pytest.raises(KeyturnError) as info:
        target.deploy(_material(2))
    assert str(info.value).startswith(
        f"deploy target t: cannot write {tmp_path / 'private_key.pem'}"
    )
    assert "No space left on device" in str(info.value)
    monkeypatch.undo()
    assert target.read_back() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["credential.json", "private_key.pem"]


def _read_back_error(target: FileTarget) -> str:
    with pytest.raises(KeyturnError) as info:
        target.read_back()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"deploy target {target.name}: ")
    return message


def test_read_back_errors_are_one_clear_line(tmp_path: Path) -> None:
    target = FileTarget("web", tmp_path / "web")
    assert "private_key.pem is missing" in _read_back_error(target)

    material = _material()
    target.deploy(material)
    cred_file = tmp_path / "web" / "credential.json"
    key_file = tmp_path / "web" / "private_key.pem"

    cred_file.write_text('{"credentialId": "abc", ')
    assert "credential.json is not valid JSON (line 1)" in _read_back_error(target)
    cred_file.write_bytes(b"\xff\xfe")
    assert "credential.json is not valid JSON" in _read_back_error(target)
    cred_file.write_text("[1, 2]")
    assert "must hold a JSON object" in _read_back_error(target)
    cred_file.write_text('{"credentialId": "abc"}')
    assert "has no string 'credentialUuid'" in _read_back_error(target)
    cred_file.unlink()
    assert "credential.json is missing" in _read_back_error(target)

    target.deploy(material)
    key_file.write_bytes(b"garbage that is long enough to look like a secret value")
    message = _read_back_error(target)
    assert f"{key_file} is not PEM" in message
    assert "garbage" not in message
    public_only = KEYS.public_pem(material.private_key_pem).encode()
    key_file.write_bytes(public_only)
    assert "is not a valid PEM private key" in _read_back_error(target)


def test_target_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(KeyturnError, match="exists and is not a directory"):
        FileTarget("t", tmp_path / "afile").deploy(_material())


def test_reprs_and_errors_carry_no_key(tmp_path: Path) -> None:
    target = FileTarget("t", tmp_path)
    material = _material()
    target.deploy(material)
    shown = repr(target) + repr(material) + repr(target.read_back())
    assert scan_bytes(shown, {"key": material.private_key_pem}) == []
