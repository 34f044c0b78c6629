"""The file deploy target: a directory a holder of the credential reads its key from.

Layout: ``private_key.pem`` (the PEM private key) and ``credential.json``
(``{"credentialId": ..., "credentialUuid": ...}``). Each file is replaced atomically: a temporary
file in the same directory, created with mode 0600, written, fsynced, renamed over the old one
with ``os.replace``, then the directory is fsynced so the rename survives a crash. A reader sees
either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

from keyturn.adapters.keys import InvalidPrivateKey, load_private_key
from keyturn.domain.errors import KeyturnError
from keyturn.ports import DeployedMaterial, DeployTarget

PRIVATE_KEY_FILE: Final = "private_key.pem"
CREDENTIAL_FILE: Final = "credential.json"
FILE_MODE: Final = 0o600
DIRECTORY_MODE: Final = 0o700


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Replace `path` with `data` atomically and durably; the file ends with `mode`."""
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        # mkstemp creates the file 0600 already; set the mode explicitly in case it differs.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)  # os.replace: atomic within one filesystem
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(directory)


def read_deployed(path: Path, what: str, error: Callable[[str], KeyturnError]) -> bytes:
    """A deployed file's bytes, or the target's one-line error (missing, unreadable)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path} is missing; deploy {what} to this target again") from None
    except OSError as exc:
        raise error(f"cannot read {path} ({exc.strerror})") from None


def credential_json(material: DeployedMaterial) -> bytes:
    document = {
        "credentialId": material.credential_id,
        "credentialUuid": material.credential_uuid,
    }
    return (json.dumps(document, indent=2) + "\n").encode("utf-8")


class FileTarget(DeployTarget):
    """Deploys a signing key as two files in `directory` (created 0700 if missing)."""

    def __init__(self, name: str, directory: Path) -> None:
        self._name = name
        self.directory = Path(directory)

    @property
    def name(self) -> str:
        return self._name

    @property
    def key_path(self) -> Path:
        return self.directory / PRIVATE_KEY_FILE

    @property
    def credential_path(self) -> Path:
        return self.directory / CREDENTIAL_FILE

    def _error(self, problem: str) -> KeyturnError:
        return KeyturnError(f"deploy target {self._name}: {problem}")

    def _ensure_directory(self) -> None:
        if self.directory.is_dir():
            return
        if self.directory.exists():
            raise self._error(
                f"{self.directory} exists and is not a directory; point the target at a directory"
            )
        try:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            self.directory.mkdir(mode=DIRECTORY_MODE)
        except FileExistsError:
            pass  # created concurrently: fine
        except OSError as exc:
            raise self._error(
                f"cannot create directory {self.directory} ({exc.strerror}); "
                "create it (mode 0700) or fix the permissions of its parent"
            ) from None
        # mkdir's mode is filtered by the umask; make it exactly 0700.
        self.directory.chmod(DIRECTORY_MODE)

    def _write_if_changed(self, path: Path, data: bytes) -> None:
        try:
            st = path.stat()
            unchanged = (st.st_mode & 0o777) == FILE_MODE and path.read_bytes() == data
        except OSError:
            unchanged = False
        if unchanged:
            return
        try:
            write_atomically(path, data)
        except OSError as exc:
            raise self._error(
                f"cannot write {path} ({exc.strerror}); check the directory's permissions and "
                "free space"
            ) from None

    def deploy(self, material: DeployedMaterial) -> None:
        """Write the key, then the credential ids; each atomic; a no-op when already there."""
        self._ensure_directory()
        self._write_if_changed(self.key_path, bytes(material.private_key_pem))
        self._write_if_changed(self.credential_path, credential_json(material))

    def read_back(self) -> DeployedMaterial:
        """What a holder would load now: both files, validated; KeyturnError otherwise."""
        private_pem = read_deployed(self.key_path, "the credential", self._error)
        try:
            load_private_key(private_pem, what=str(self.key_path))
        except InvalidPrivateKey as exc:
            raise self._error(f"{exc}; deploy the credential to this target again") from None
        raw = read_deployed(self.credential_path, "the credential", self._error)
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
            raise self._error(
                f"{self.credential_path} is not valid JSON{where}; deploy the credential to "
                "this target again"
            ) from None
        if not isinstance(document, dict):
            raise self._error(f"{self.credential_path} must hold a JSON object")
        fields: dict[str, str] = {}
        for key in ("credentialId", "credentialUuid"):
            value = document.get(key)
            if not isinstance(value, str) or not value:
                raise self._error(
                    f"{self.credential_path} has no string {key!r}; deploy the credential to "
                    "this target again"
                )
            fields[key] = value
        return DeployedMaterial(
            private_key_pem=private_pem,
            credential_id=fields["credentialId"],
            credential_uuid=fields["credentialUuid"],
        )

    def __repr__(self) -> str:
        return f"FileTarget(name={self._name!r}, directory={str(self.directory)!r})"
