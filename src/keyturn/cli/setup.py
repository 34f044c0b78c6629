"""Set-up commands: import a credential, rotate the master key.

Each validates all of its input before it writes anything, so bad input changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path

from keyturn.adapters.vault import AesGcmVault, load_master_key
from keyturn.cli.wiring import Wiring
from keyturn.domain.errors import ConfigError, KeyturnError, NotFound
from keyturn.domain.model import ManagedCredential, SealedSecret
from keyturn.engine.registry import discovered
from keyturn.engine.spi import CredentialConfig, ImportSpec, ProviderAccess


def _secret_id() -> str:
    return f"sec_{uuid.uuid4().hex}"


def _read(option: str, path: Path, what: str, *, strip: bool = True) -> bytes:
    """The file's bytes; surrounding whitespace removed only when `strip` (text, not binary
    material: a random secret may begin or end with a byte that looks like whitespace)."""
    try:
        raw = path.read_bytes()
        data = raw.strip() if strip else raw
    except OSError as exc:
        raise KeyturnError(f"{option} {path} cannot be read ({exc.strerror})") from None
    if not data.strip():
        raise KeyturnError(f"{option} {path} is empty; it must hold the {what}")
    return data


@dataclass(frozen=True)
class ImportEntry:
    """One credential to bring under management (a command line's options, or one entry of
    an import file)."""

    name: str
    kind: str
    provider: str
    credential_id: str
    credential_uuid: str | None = None
    material_file: Path | None = None
    material_option: str = "--private-key-file"
    token_file: Path | None = None


def import_credential(w: Wiring, entry: ImportEntry, *, verify: bool = True) -> ManagedCredential:
    """Start managing a credential that exists already: the kind says what it needs; the
    provider is asked first (it exists, is active, the key is its key). All or nothing.
    `verify=False` skips the provider's check (bulk set-up of accounts just created, tests)."""
    managed, sealed = asyncio.run(_prepared(w, entry, verify))
    w.store.add_credential(managed, sealed)
    return managed


def import_many(w: Wiring, entries: list[ImportEntry]) -> tuple[list[str], list[str]]:
    """Each entry checked and stored on its own (one transaction each): (imported names, one
    line per refused entry)."""
    imported, refused = [], []
    seen: set[str] = set()
    for entry in entries:
        try:
            if entry.name in seen:
                raise KeyturnError("listed twice in the file")
            seen.add(entry.name)
            import_credential(w, entry)
        except KeyturnError as exc:
            refused.append(f"{entry.name}: {exc}")
        else:
            imported.append(entry.name)
    return imported, refused


def _check_entry(w: Wiring, e: ImportEntry, cfg: CredentialConfig, spec: ImportSpec) -> None:
    """The entry agrees with its config section, is not managed yet, and brings what its kind
    needs."""
    if cfg.kind != e.kind:
        raise ConfigError(
            f"--kind {e.kind} does not match [credentials.{e.name}] kind = {cfg.kind}; "
            "make them agree"
        )
    if cfg.provider != e.provider:
        raise ConfigError(
            f"--provider {e.provider} does not match [credentials.{e.name}] provider = "
            f"{cfg.provider}; make them agree"
        )
    try:
        w.store.get_credential(e.name)
    except NotFound:
        pass
    else:
        raise KeyturnError(
            f"credential {e.name} is managed already; see `keyturn credentials list`"
        )
    if e.material_option != spec.material_option:
        raise KeyturnError(
            f"a {e.kind} credential is imported with {spec.material_option} FILE, not "
            f"{e.material_option}"
        )
    if e.material_file is None:
        raise KeyturnError(f"a {e.kind} credential needs {spec.material_option} FILE")
    if spec.needs_uuid and not e.credential_uuid:
        raise KeyturnError(f"a {e.kind} credential needs --credential-uuid UUID")


async def _prepared(
    w: Wiring, e: ImportEntry, verify: bool = True
) -> tuple[ManagedCredential, list[SealedSecret]]:
    plugin = discovered().kind(e.kind)
    spec = plugin.import_spec
    cfg = w.config.credential(e.name)
    _check_entry(w, e, cfg, spec)
    provider = w.config.provider(e.provider)
    assert e.material_file is not None  # checked
    material = _read(
        spec.material_option,
        e.material_file,
        spec.material_purpose.replace("_", " "),
        strip=spec.strip_material,
    )
    try:
        algorithm = plugin.imported(e.name, cfg, material, w)
    except KeyturnError as exc:  # the file's content is refused: say which file
        raise KeyturnError(f"{spec.material_option} {e.material_file}: {exc}") from None
    token: bytes | None = None
    if e.token_file is not None:
        token = _read("--token-file", e.token_file, "bearer token")
    elif spec.needs_token and not (cfg.token_env or cfg.token_file):
        raise ConfigError(
            f"credential {e.name} needs a bearer token: pass --token-file, or set token_env or "
            f"token_file in [credentials.{e.name}]"
        )
    vault = w.checked_vault()
    uuid_ = e.credential_uuid or e.credential_id
    if verify and spec.needs_token:
        bearer = token.decode() if token is not None else w.token_for(e.name)
        access = ProviderAccess(
            credential=e.name,
            provider=e.provider,
            base_url=provider.base_url,
            token=bearer,
            timeout_seconds=provider.timeout_seconds,
            budget=w.budget(e.provider),
        )
        await plugin.verify_import(access, e.credential_id, uuid_, material)
    key_ref = _secret_id()
    sealed: list[SealedSecret] = [vault.seal(key_ref, spec.material_purpose, material)]
    token_ref = None
    if token is not None:
        token_ref = _secret_id()
        sealed.append(vault.seal(token_ref, "token", token))
    managed = ManagedCredential(
        name=e.name,
        kind=e.kind,
        provider=e.provider,
        credential_id=e.credential_id,
        credential_uuid=uuid_,
        key_ref=key_ref,
        algorithm=algorithm,
        token_ref=token_ref,
    )
    return managed, sealed


_FILE_KEYS = {
    "name", "kind", "provider", "credential_id", "credential_uuid", "private_key_file",
    "secret_file", "token_file",
}  # fmt: skip


def read_import_file(path: Path) -> list[ImportEntry]:
    """Entries of an import file: JSON lines (one object per line) or TOML (``[[credentials]]``
    tables); the keys are the command's options with underscores; relative paths are relative
    to the file. KeyturnError naming the line or entry and the fix."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyturnError(
            f"--file {path} cannot be read ({getattr(exc, 'strerror', exc)})"
        ) from None
    items: list[tuple[str, object]] = []
    if path.suffix == ".toml":
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise KeyturnError(f"--file {path} is not valid TOML ({exc})") from None
        listed = document.get("credentials")
        if not isinstance(listed, list) or set(document) != {"credentials"}:
            raise KeyturnError(f"--file {path}: expected [[credentials]] tables only")
        items = [(f"[[credentials]] #{i + 1}", t) for i, t in enumerate(listed)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                items.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise KeyturnError(f"--file {path} line {n} is not JSON ({exc.msg})") from None
    return [_entry(path, where, item) for where, item in items]


def _entry(path: Path, where: str, item: object) -> ImportEntry:
    if not isinstance(item, dict):
        raise KeyturnError(f"--file {path} {where}: expected an object of the import's options")
    unknown = sorted(set(item) - _FILE_KEYS)
    missing = [k for k in ("name", "kind", "provider", "credential_id") if k not in item]
    if unknown or missing:
        raise KeyturnError(
            f"--file {path} {where}: "
            + (f"unknown keys {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}")
            + f"; use {', '.join(sorted(_FILE_KEYS))}"
        )
    if not all(isinstance(v, str) for v in item.values()):
        raise KeyturnError(f"--file {path} {where}: every value must be a string")

    def file(key: str) -> Path | None:
        value = item.get(key)
        return None if value is None else (path.parent / value)

    secret = file("secret_file")
    return ImportEntry(
        name=item["name"],
        kind=item["kind"],
        provider=item["provider"],
        credential_id=item["credential_id"],
        credential_uuid=item.get("credential_uuid"),
        material_file=secret if secret is not None else file("private_key_file"),
        material_option="--secret-file" if secret is not None else "--private-key-file",
        token_file=file("token_file"),
    )


def rotate_master(w: Wiring, new_key_file: Path) -> tuple[int, str]:
    new_key = load_master_key(None, new_key_file)
    old_vault = w.checked_vault()
    new_vault = AesGcmVault(new_key)
    rewrapped = [old_vault.rewrap(s, new_vault) for s in w.store.all_secrets() if s.ciphertext]
    w.store.replace_secrets(rewrapped)
    return len(rewrapped), new_vault.key_id
