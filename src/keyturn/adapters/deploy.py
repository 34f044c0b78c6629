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
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

from keyturn.adapters.keys import InvalidPrivateKey, load_private_key
from keyturn.adapters.material import (
    CREDENTIAL_KEY,
    MANAGED_BY,
    MANAGED_BY_KEY,
    content_id,
    same_material,
)
from keyturn.domain.errors import KeyturnError, StepError
from keyturn.ports import DeployedMaterial, DeployTarget

PRIVATE_KEY_FILE: Final = "private_key.pem"
VERSIONS: Final = "versions"
CURRENT: Final = "current"
PREVIOUS: Final = "previous"
STAGED: Final = "staged"
MARKER_FILE: Final = ".keyturn-managed"
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
    """Deploys a signing key as two files in `directory` (created 0700 if missing), in
    versions, so that the key and its credential ids change together for readers.

    Layout::

        versions/<content id>/private_key.pem, credential.json   one directory per version
        current  -> versions/<id>      what holders load (a symlink, swapped atomically)
        previous -> versions/<id>      what rollback restores
        staged   -> versions/<id>      written by stage, not read by holders
        private_key.pem -> current/private_key.pem   (and credential.json): for readers of
                                                     the plain file names
        .keyturn-managed               the mark: keyturn manages this directory

    A reader that resolves ``current`` once (``os.path.realpath``) and reads both files from
    there always gets a key and the credential id that belong together. A directory laid out
    by an earlier keyturn (the two files, no ``versions/``) is taken over: its files become
    the previous version. Anything else already there is refused unless ``adopt``.
    """

    def __init__(self, name: str, directory: Path, *, adopt: bool = False) -> None:
        self._name = name
        self.directory = Path(directory)
        self.adopt = adopt

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

    def _ensure_directory(self, path: Path) -> None:
        if path.is_dir():
            return
        if path.exists() or path.is_symlink():
            raise self._error(
                f"{path} exists and is not a directory; point the target at a directory"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir(mode=DIRECTORY_MODE)
        except FileExistsError:
            pass  # created concurrently: fine
        except OSError as exc:
            raise self._error(
                f"cannot create directory {path} ({exc.strerror}); "
                "create it (mode 0700) or fix the permissions of its parent"
            ) from None
        # mkdir's mode is filtered by the umask; make it exactly 0700.
        path.chmod(DIRECTORY_MODE)

    def _os(self, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except OSError as exc:
            raise self._error(
                f"cannot {what} ({exc.strerror}); check the directory's permissions and free space"
            ) from None

    # ------------------------------------------------------------------ layout

    def _link(self, name: str) -> str | None:
        """The version a symlink (current, previous, staged) points at, or None."""
        path = self.directory / name
        if not path.is_symlink():
            return None
        return path.readlink().name

    def _point(self, name: str, version: str) -> None:
        """Swap the symlink `name` to versions/<version> atomically (rename over it)."""
        if self._link(name) == version:
            return
        tmp = self.directory / f".{name}.{os.getpid()}.tmp"
        what = f"point {name} at version {version}"
        self._swap_link(tmp, f"{VERSIONS}/{version}", self.directory / name, what)
        _fsync_directory(self.directory)

    def _version_dir(self, version: str) -> Path:
        return self.directory / VERSIONS / version

    def _write_version(self, material: DeployedMaterial) -> str:
        """The version directory holding `material` (written, fsynced, when new)."""
        version = content_id(material)
        final = self._version_dir(version)
        if final.is_dir() and self._intact(final, material):
            return version
        self._ensure_directory(self.directory / VERSIONS)
        tmp = self.directory / VERSIONS / f".{version}.{os.getpid()}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        self._ensure_directory(tmp)

        def write() -> None:
            write_atomically(tmp / PRIVATE_KEY_FILE, bytes(material.private_key_pem))
            write_atomically(tmp / CREDENTIAL_FILE, credential_json(material))
            if final.exists():
                shutil.rmtree(final)  # a torn version of the same content: replace it
            tmp.replace(final)

        self._os(f"write version {version} in {self.directory / VERSIONS}", write)
        _fsync_directory(self.directory / VERSIONS)
        return version

    def _intact(self, version: Path, material: DeployedMaterial) -> bool:
        """The version directory holds exactly `material`, in files of mode 0600."""
        try:
            modes = {
                (version / f).stat().st_mode & 0o777 for f in (PRIVATE_KEY_FILE, CREDENTIAL_FILE)
            }
            return modes == {FILE_MODE} and same_material(self._read_pair(version), material)
        except (OSError, KeyturnError):
            return False

    def _claim(self, credential: str) -> None:
        """Refuse a directory keyturn does not manage (unless adopt); mark it; take over the
        flat layout of an earlier keyturn as the previous version."""
        self._ensure_directory(self.directory)
        marker = self.directory / MARKER_FILE
        if marker.exists():
            return
        entries = {p.name for p in self.directory.iterdir()}
        flat = {PRIVATE_KEY_FILE, CREDENTIAL_FILE} <= entries and not self.key_path.is_symlink()
        legacy: DeployedMaterial | None = None
        if flat:
            with contextlib.suppress(KeyturnError):
                legacy = self._read_pair(self.directory)
        foreign = entries - {PRIVATE_KEY_FILE, CREDENTIAL_FILE} if legacy else entries
        if foreign and not self.adopt:
            shown = ", ".join(sorted(foreign)[:3])
            raise StepError(
                f"deploy target {self._name}: {self.directory} holds files keyturn did not "
                f"write ({shown}); point the target at an empty directory, or set adopt = true "
                "in its [[credentials.NAME.targets]] table to let keyturn take it over",
                retryable=False,
            )
        if legacy is not None:
            version = self._write_version(legacy)
            self._point(CURRENT, version)
        document = {MANAGED_BY_KEY: MANAGED_BY, CREDENTIAL_KEY: credential}
        self._os(f"write {marker}", lambda: write_atomically(marker, json.dumps(document).encode()))

    def _expose(self) -> None:
        """The plain file names point into current/ (once; a flat file is replaced)."""
        for file in (PRIVATE_KEY_FILE, CREDENTIAL_FILE):
            path = self.directory / file
            wanted = f"{CURRENT}/{file}"
            if path.is_symlink() and str(path.readlink()) == wanted:
                continue
            self._swap_link(self.directory / f".{file}.{os.getpid()}.link", wanted, path)
        _fsync_directory(self.directory)

    def _swap_link(self, tmp: Path, to: str, path: Path, what: str = "") -> None:
        def swap() -> None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(to)
            try:
                tmp.replace(path)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise

        self._os(what or f"link {path}", swap)

    def _prune(self) -> None:
        """Versions other than current, previous and staged are removed (old key material
        does not linger on disk)."""
        keep = {self._link(CURRENT), self._link(PREVIOUS), self._link(STAGED)}
        versions = self.directory / VERSIONS
        for entry in versions.iterdir() if versions.is_dir() else ():
            if entry.name not in keep and not entry.name.startswith("."):
                with contextlib.suppress(OSError):
                    shutil.rmtree(entry)

    def _make_current(self, version: str) -> bool:
        current = self._link(CURRENT)
        if current == version:
            self._expose()
            return False
        if current is not None:
            self._point(PREVIOUS, current)
        self._point(CURRENT, version)
        self._expose()
        self._prune()
        return True

    # ------------------------------------------------------------------ the cycle

    def stage(self, material: DeployedMaterial, credential: str = "") -> dict[str, object]:
        self._claim(credential)
        version = self._write_version(material)
        changed = self._link(STAGED) != version
        self._point(STAGED, version)
        return {"changed": changed, "version": version}

    def promote(self, material: DeployedMaterial) -> dict[str, object]:
        version = content_id(material)
        if self._link(STAGED) != version and self._link(CURRENT) != version:
            raise StepError(
                f"deploy target {self._name}: the staged version is not the key to promote; "
                "stage it again (resume the rotation)",
                retryable=True,
            )
        return {"changed": self._make_current(version), "version": version}

    def rollback(self, previous: DeployedMaterial, credential: str = "") -> dict[str, object]:
        self._claim(credential)
        version = self._write_version(previous)
        return {"changed": self._make_current(version), "version": version}

    def deploy(self, material: DeployedMaterial, credential: str = "") -> None:
        """Stage and promote at once (a first deployment, tests)."""
        self.stage(material, credential)
        self.promote(material)

    def read_back(self, *, staged: bool = False) -> DeployedMaterial:
        """What a holder would load now (``staged``: what stage wrote): both files of one
        version, validated; KeyturnError otherwise."""
        if staged:
            link = self.directory / STAGED
            if not link.is_symlink():
                raise self._error(f"nothing is staged in {self.directory}; stage the key again")
            return self._read_pair(link.resolve())
        current = self.directory / CURRENT
        if current.is_symlink():
            return self._read_pair(current.resolve())
        return self._read_pair(self.directory)

    def _read_pair(self, directory: Path) -> DeployedMaterial:
        """Both files of one version, validated; KeyturnError otherwise."""
        key_path, credential_path = directory / PRIVATE_KEY_FILE, directory / CREDENTIAL_FILE
        private_pem = read_deployed(key_path, "the credential", self._error)
        try:
            load_private_key(private_pem, what=str(key_path))
        except InvalidPrivateKey as exc:
            raise self._error(f"{exc}; deploy the credential to this target again") from None
        raw = read_deployed(credential_path, "the credential", self._error)
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
            raise self._error(
                f"{credential_path} is not valid JSON{where}; deploy the credential to "
                "this target again"
            ) from None
        if not isinstance(document, dict):
            raise self._error(f"{credential_path} must hold a JSON object")
        fields: dict[str, str] = {}
        for key in ("credentialId", "credentialUuid"):
            value = document.get(key)
            if not isinstance(value, str) or not value:
                raise self._error(
                    f"{credential_path} has no string {key!r}; deploy the credential to "
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
