"""The vault: secrets sealed with AES-256-GCM under a master key (implements the Vault port).

The master key (the key-encryption key) comes from the environment or a file, never from the
database. Its text form is ``ktmk1.<base64url of 32 bytes, no padding>``; its id is the first 16
hex characters of SHA-256("keyturn master key id\\0" + key bytes), and every ciphertext names the
id of the key it was made with.

The associated data of every ciphertext binds the secret id, its purpose and the master key id,
so a ciphertext copied to another row or another purpose fails authentication instead of opening
as the wrong secret. Nothing here ever puts key bytes or plaintext in a message or a repr.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyturn.domain.errors import ConfigError, SecretError
from keyturn.domain.model import SealedSecret
from keyturn.ports import Vault

MASTER_KEY_PREFIX: Final = "ktmk1."
MASTER_KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12
DEFAULT_ENV_NAME: Final = "KEYTURN_MASTER_KEY"
FILE_SETTING: Final = "keys.master_key_file"

_KEY_ID_CONTEXT: Final = b"keyturn master key id\0"
_AAD_CONTEXT: Final = b"keyturn sealed secret v1\0"
# 32 bytes are 43 base64url characters without padding.
_KEY_TEXT_RE: Final = re.compile(r"ktmk1\.[A-Za-z0-9_-]{43}")
_CREATE_HINT: Final = "create one with `keyturn keys new-master`"


def master_key_id(key: bytes) -> str:
    """The public id of a master key: 16 hex characters derived from it (not reversible)."""
    return hashlib.sha256(_KEY_ID_CONTEXT + key).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class MasterKey:
    """A 256-bit key-encryption key and its id. The repr shows the id only."""

    key: bytes = field(repr=False)
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.key) != MASTER_KEY_BYTES:
            raise ConfigError(
                f"a master key must be {MASTER_KEY_BYTES} bytes, not {len(self.key)}; "
                f"{_CREATE_HINT}"
            )
        object.__setattr__(self, "key_id", master_key_id(self.key))

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(secrets.token_bytes(MASTER_KEY_BYTES))

    def text(self) -> str:
        """The ``ktmk1.`` text form (secret: write it only where a master key belongs)."""
        return MASTER_KEY_PREFIX + base64.urlsafe_b64encode(self.key).rstrip(b"=").decode("ascii")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MasterKey):
            return NotImplemented
        return secrets.compare_digest(self.key, other.key)

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __repr__(self) -> str:
        return f"MasterKey(key_id={self.key_id!r})"

    __str__ = __repr__


def new_master_key() -> str:
    """A fresh random master key in its text form."""
    return MasterKey.generate().text()


def parse_master_key(text: str, source: str) -> MasterKey:
    """Parse the text form; `source` names where it came from (for the error, e.g.
    "environment variable KEYTURN_MASTER_KEY" or "master key file /etc/keyturn/master.key").

    The error never echoes the value, not even a prefix of it.
    """
    value = text.strip()
    if not value:
        raise ConfigError(f"{source} is empty; {_CREATE_HINT}")
    if not _KEY_TEXT_RE.fullmatch(value):
        raise ConfigError(
            f"{source} does not hold a keyturn master key (expected 'ktmk1.' followed by 43 "
            f"base64url characters); {_CREATE_HINT}"
        )
    encoded = value[len(MASTER_KEY_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(encoded + "=")
    except (binascii.Error, ValueError):  # pragma: no cover - the pattern excludes this
        raw = b""
    key = MasterKey(raw) if len(raw) == MASTER_KEY_BYTES else None
    # Only the canonical encoding is accepted (the last character's spare bits are zero), so a
    # key has exactly one text form.
    if key is None or not secrets.compare_digest(key.text(), value):
        raise ConfigError(
            f"{source} does not hold a valid keyturn master key (its base64url part does not "
            f"decode to {MASTER_KEY_BYTES} bytes canonically); {_CREATE_HINT}"
        )
    return key


def master_key_source(
    env_value: str | None,
    file: Path | None,
    env_name: str = DEFAULT_ENV_NAME,
    setting: str = FILE_SETTING,
) -> str:
    """Where :func:`load_master_key` takes the key from, in words an error can name: the
    environment variable (it wins when not empty) or the file and the setting naming it."""
    if env_value is not None and env_value.strip():
        return f"environment variable {env_name}"
    if file is None:
        return "no master key"
    return f"master key file {file} ({setting})"


def load_master_key(
    env_value: str | None,
    file: Path | None,
    env_name: str = DEFAULT_ENV_NAME,
    *,
    setting: str | None = None,
) -> MasterKey:
    """The master key from the environment variable's value (wins) or from `file`.

    The file must be a regular file with no permission bits for group or others. An empty
    environment variable counts as unset. `setting` names where `file` was configured (e.g.
    "keys.master_key_file in /etc/keyturn/keyturn.toml"), for the errors.
    """
    if env_value is not None and env_value.strip():
        return parse_master_key(env_value, f"environment variable {env_name}")
    if file is None:
        raise ConfigError(
            f"no master key configured: {env_name} is unset and {setting or FILE_SETTING} is "
            "not set; set one of them; create a key with `keyturn keys new-master`"
        )
    path = Path(file)
    named = f"master key file {path}" + (f" ({setting})" if setting else "")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(
            f"{named} does not exist; create it with "
            f"`keyturn keys new-master > {path} && chmod 600 {path}` or set {env_name}"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{named} cannot be read ({exc.strerror}); check its path and permissions"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{named} is not a regular file; point it at a file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(f"{named} has mode {mode:04o}; run chmod 600 {path}")
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{named} does not hold a keyturn master key (not ASCII text); {_CREATE_HINT}"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{named} cannot be read ({exc.strerror}); check its permissions"
        ) from None
    return parse_master_key(text, named)


def _field(value: str) -> bytes:
    data = value.encode("utf-8")
    return len(data).to_bytes(4, "big") + data


def associated_data(secret_id: str, purpose: str, master_key_id: str) -> bytes:
    """The AEAD associated data: length-prefixed id, purpose and master key id (unambiguous)."""
    return _AAD_CONTEXT + _field(secret_id) + _field(purpose) + _field(master_key_id)


def _when(at: datetime) -> str:
    if at.tzinfo is not None:
        at = at.astimezone(UTC)
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


class AesGcmVault(Vault):
    """Seal with the current master key; open with the current or any previous one."""

    def __init__(
        self,
        current: MasterKey,
        previous: Sequence[MasterKey] = (),
        *,
        source: str | None = None,
    ) -> None:
        #: Where the current key came from (e.g. "environment variable KEYTURN_MASTER_KEY"),
        #: named when a secret needs another key.
        self.source = source
        self._current = current
        self._keys: dict[str, AESGCM] = {}
        for key in (current, *previous):
            self._keys.setdefault(key.key_id, AESGCM(key.key))
        self._previous_ids = tuple(k.key_id for k in previous if k.key_id != current.key_id)

    @property
    def key_id(self) -> str:
        return self._current.key_id

    @property
    def key_ids(self) -> frozenset[str]:
        """Every master key id this vault can open (current and previous)."""
        return frozenset(self._keys)

    def seal(self, secret_id: str, purpose: str, plaintext: bytes) -> SealedSecret:
        if not secret_id:
            raise ValueError("a sealed secret needs a non-empty id")
        nonce = os.urandom(NONCE_BYTES)
        aad = associated_data(secret_id, purpose, self.key_id)
        ciphertext = self._keys[self.key_id].encrypt(nonce, bytes(plaintext), aad)
        return SealedSecret(
            id=secret_id,
            purpose=purpose,
            master_key_id=self.key_id,
            nonce=nonce,
            ciphertext=ciphertext,
            created_at=datetime.now(UTC),
        )

    def open(self, sealed: SealedSecret) -> bytes:
        if sealed.purged_at is not None:
            raise SecretError(
                f"secret {sealed.id} was purged on {_when(sealed.purged_at)} after its "
                "retention period"
            )
        if not sealed.ciphertext:
            raise SecretError(f"secret {sealed.id} was purged after its retention period")
        aead = self._keys.get(sealed.master_key_id)
        if aead is None:
            configured = self.key_id
            if self._previous_ids:
                configured += f" (previous: {', '.join(self._previous_ids)})"
            whose = (
                f"the master key from {self.source}" if self.source else "the configured master key"
            )
            raise SecretError(
                f"secret {sealed.id} was encrypted with master key {sealed.master_key_id} but "
                f"{whose} is {configured}; set {DEFAULT_ENV_NAME} or "
                f"{FILE_SETTING} to the key the database was encrypted with"
            )
        aad = associated_data(sealed.id, sealed.purpose, sealed.master_key_id)
        try:
            return aead.decrypt(sealed.nonce, sealed.ciphertext, aad)
        except (InvalidTag, ValueError):
            # ValueError: a nonce of an impossible length, which is tampering too.
            raise SecretError(
                f"secret {sealed.id} failed authentication: it was tampered with or moved to "
                "another row"
            ) from None

    def rewrap(self, sealed: SealedSecret, new_vault: Vault) -> SealedSecret:
        """Re-encrypt under `new_vault`'s master key, keeping id, purpose and timestamps."""
        plaintext = self.open(sealed)
        fresh = new_vault.seal(sealed.id, sealed.purpose, plaintext)
        return replace(
            fresh,
            created_at=sealed.created_at or fresh.created_at,
            purge_after=sealed.purge_after,
            purged_at=None,
        )

    def __repr__(self) -> str:
        previous = f", previous={list(self._previous_ids)!r}" if self._previous_ids else ""
        return f"AesGcmVault(key_id={self.key_id!r}{previous})"

    __str__ = __repr__
