"""FileTarget: versions of 0600 files in a 0700 directory, a symlink swap that changes the key
and its credential id together, stage / promote / rollback, the management mark, read back,
clear errors."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyturn.adapters.deploy import FileTarget, credential_json
from keyturn.adapters.keys import CryptoKeys
from keyturn.adapters.material import content_id
from keyturn.domain.errors import KeyturnError, StepError
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


def _versions(directory: Path) -> list[str]:
    return sorted(p.name for p in (directory / "versions").iterdir())


def test_deploy_writes_both_files_with_tight_modes(tmp_path: Path, loose_umask: None) -> None:
    directory = tmp_path / "holders" / "api-server"
    target = FileTarget("api-server", directory)
    material = _material()
    target.deploy(material, "api")
    assert _mode(directory) == 0o700
    key_file, cred_file = directory / "private_key.pem", directory / "credential.json"
    assert _mode(key_file.resolve()) == 0o600
    assert _mode(cred_file.resolve()) == 0o600
    assert key_file.read_bytes() == material.private_key_pem
    assert json.loads(cred_file.read_text()) == {
        "credentialId": material.credential_id,
        "credentialUuid": material.credential_uuid,
    }
    assert sorted(p.name for p in directory.iterdir()) == [
        ".keyturn-managed",
        "credential.json",
        "current",
        "private_key.pem",
        "staged",
        "versions",
    ]
    assert json.loads((directory / ".keyturn-managed").read_text()) == {
        "managed-by": "keyturn",
        "keyturn-credential": "api",
    }
    assert target.read_back() == material
    assert target.name == "api-server"


def test_stage_leaves_what_holders_load_promote_swaps_rollback_swaps_back(tmp_path: Path) -> None:
    target = FileTarget("t", tmp_path / "d")
    old, new = _material(1), _material(2)
    target.deploy(old)
    assert target.stage(new)["changed"] is True
    assert target.read_back() == old  # holders still load the old key
    assert (tmp_path / "d" / "private_key.pem").read_bytes() == old.private_key_pem
    assert target.read_back(staged=True) == new
    assert target.promote(new)["changed"] is True
    assert target.read_back() == new
    assert (tmp_path / "d" / "private_key.pem").read_bytes() == new.private_key_pem
    assert (tmp_path / "d" / "previous").resolve().name == content_id(old)
    assert target.promote(new)["changed"] is False  # idempotent
    assert target.rollback(old)["changed"] is True
    assert target.read_back() == old
    assert target.rollback(old)["changed"] is False


def test_unchanged_content_writes_nothing(tmp_path: Path) -> None:
    target = FileTarget("t", tmp_path / "d")
    first = _material(1)
    target.deploy(first)
    inode = (tmp_path / "d" / "private_key.pem").resolve().stat().st_ino
    assert target.stage(first)["changed"] is False
    assert target.promote(first)["changed"] is False
    assert (tmp_path / "d" / "private_key.pem").resolve().stat().st_ino == inode
    assert _versions(tmp_path / "d") == [content_id(first)]


def test_promote_refuses_a_key_that_was_not_staged(tmp_path: Path) -> None:
    target = FileTarget("t", tmp_path / "d")
    target.deploy(_material(1))
    with pytest.raises(StepError, match="the staged version is not the key to promote"):
        target.promote(_material(2))


def test_old_versions_are_pruned_keeping_current_and_previous(tmp_path: Path) -> None:
    target = FileTarget("t", tmp_path / "d")
    keys = [_material(n) for n in range(4)]
    for m in keys:
        target.deploy(m)
    assert _versions(tmp_path / "d") == sorted([content_id(keys[3]), content_id(keys[2])])


def test_a_directory_keyturn_did_not_write_is_refused_unless_adopted(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "app.conf").write_text("x")
    with pytest.raises(StepError, match=r"holds files keyturn did not write \(app.conf\);.*adopt"):
        FileTarget("t", tmp_path / "d").stage(_material())
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["app.conf"]
    FileTarget("t", tmp_path / "d", adopt=True).deploy(_material())
    assert (tmp_path / "d" / ".keyturn-managed").exists()
    assert (tmp_path / "d" / "app.conf").read_text() == "x"  # never deleted


def test_the_flat_layout_of_an_earlier_keyturn_becomes_the_previous_version(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "d"
    directory.mkdir()
    old, new = _material(1), _material(2)
    (directory / "private_key.pem").write_bytes(old.private_key_pem)
    (directory / "credential.json").write_bytes(credential_json(old))
    target = FileTarget("t", directory)
    assert target.read_back() == old
    target.stage(new)
    assert target.read_back() == old
    target.promote(new)
    assert target.read_back() == new
    assert (directory / "private_key.pem").is_symlink()
    target.rollback(old)
    assert (directory / "private_key.pem").read_bytes() == old.private_key_pem


def test_existing_file_with_loose_mode_is_rewritten_0600(tmp_path: Path) -> None:
    target = FileTarget("t", tmp_path)
    material = _material()
    target.deploy(material)
    version = (tmp_path / "private_key.pem").resolve()
    version.chmod(0o644)
    target.deploy(_material(2))
    target.rollback(material)
    assert _mode((tmp_path / "private_key.pem").resolve()) == 0o600


def test_a_reader_never_sees_a_key_with_another_keys_credential_id(tmp_path: Path) -> None:
    """Promote two keys alternately while a reader resolves current once and reads both files:
    it only ever sees a whole key with its own credential id."""
    target = FileTarget("t", tmp_path)
    materials = [_material(1), _material(2)]
    target.deploy(materials[0])
    target.stage(materials[1])
    pairs = {(m.private_key_pem, credential_json(m)) for m in materials}
    seen: set[bytes] = set()
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            version = Path(os.path.realpath(tmp_path / "current"))
            pair = (
                (version / "private_key.pem").read_bytes(),
                (version / "credential.json").read_bytes(),
            )
            if pair in pairs:
                seen.add(pair[0])
            else:
                bad.append(version.name)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(300):
            target.rollback(materials[i % 2])
    finally:
        stop.set()
        thread.join()
    assert bad == []
    assert len(seen) == 2


def test_a_failed_swap_leaves_the_old_key_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = FileTarget("t", tmp_path)
    old, new = _material(1), _material(2)
    target.deploy(old)
    target.stage(new)

    def broken_replace(self: Path, other: Path) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", broken_replace)
    with pytest.raises(KeyturnError) as info:
        target.promote(new)
    assert str(info.value).startswith("deploy target t: cannot point previous at version")
    assert "No space left on device" in str(info.value)
    monkeypatch.undo()
    assert target.read_back() == old
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


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
    cred_file = (tmp_path / "web" / "credential.json").resolve()
    key_file = (tmp_path / "web" / "private_key.pem").resolve()

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

    cred_file.write_bytes(credential_json(material))
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
