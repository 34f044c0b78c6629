"""Set-up commands: import a credential, rotate the master key.

Each validates all of its input before it writes anything, so bad input changes nothing.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from keyturn.adapters.vault import AesGcmVault, load_master_key
from keyturn.cli.wiring import Wiring
from keyturn.domain.errors import ConfigError, KeyturnError, NotFound
from keyturn.domain.model import ManagedCredential, SealedSecret
from keyturn.engine.registry import discovered


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


def import_credential(
    w: Wiring,
    *,
    name: str,
    kind: str,
    provider: str,
    material_file: Path | None,
    material_option: str,
    credential_id: str,
    credential_uuid: str | None,
    token_file: Path | None,
) -> None:
    """Start managing a credential that exists already: the kind says what it needs."""
    plugin = discovered().kind(kind)
    spec = plugin.import_spec
    cfg = w.config.credential(name)
    if cfg.kind != kind:
        raise ConfigError(
            f"--kind {kind} does not match [credentials.{name}] kind = {cfg.kind}; make them agree"
        )
    if cfg.provider != provider:
        raise ConfigError(
            f"--provider {provider} does not match [credentials.{name}] provider = "
            f"{cfg.provider}; make them agree"
        )
    w.config.provider(provider)
    try:
        w.store.get_credential(name)
    except NotFound:
        pass
    else:
        raise KeyturnError(f"credential {name} is managed already; see `keyturn credentials list`")
    if material_option != spec.material_option:
        raise KeyturnError(
            f"a {kind} credential is imported with {spec.material_option} FILE, not "
            f"{material_option}"
        )
    if material_file is None:
        raise KeyturnError(f"a {kind} credential needs {spec.material_option} FILE")
    if spec.needs_uuid and not credential_uuid:
        raise KeyturnError(f"a {kind} credential needs --credential-uuid UUID")
    material = _read(
        spec.material_option,
        material_file,
        spec.material_purpose.replace("_", " "),
        strip=spec.strip_material,
    )
    algorithm = plugin.imported(name, cfg, material, w)
    token: bytes | None = None
    if token_file is not None:
        token = _read("--token-file", token_file, "bearer token")
    elif spec.needs_token and not (cfg.token_env or cfg.token_file):
        raise ConfigError(
            f"credential {name} needs a bearer token: pass --token-file, or set token_env or "
            f"token_file in [credentials.{name}]"
        )
    vault = w.checked_vault()
    key_ref = _secret_id()
    sealed: list[SealedSecret] = [vault.seal(key_ref, spec.material_purpose, material)]
    token_ref = None
    if token is not None:
        token_ref = _secret_id()
        sealed.append(vault.seal(token_ref, "token", token))
    w.store.add_credential(
        ManagedCredential(
            name=name,
            kind=kind,
            provider=provider,
            credential_id=credential_id,
            credential_uuid=credential_uuid or credential_id,
            key_ref=key_ref,
            algorithm=algorithm,
            token_ref=token_ref,
        ),
        sealed,
    )


def rotate_master(w: Wiring, new_key_file: Path) -> tuple[int, str]:
    new_key = load_master_key(None, new_key_file)
    old_vault = w.checked_vault()
    new_vault = AesGcmVault(new_key)
    rewrapped = [old_vault.rewrap(s, new_vault) for s in w.store.all_secrets() if s.ciphertext]
    w.store.replace_secrets(rewrapped)
    return len(rewrapped), new_vault.key_id
