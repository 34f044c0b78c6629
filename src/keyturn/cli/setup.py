"""Set-up commands: init a working directory, import a credential, rotate the master key.

Each validates all of its input before it writes anything, so bad input changes nothing.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from keyturn.adapters.deploy import FileTarget
from keyturn.adapters.keys import CryptoKeys
from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.vault import AesGcmVault, load_master_key, new_master_key
from keyturn.cli.wiring import Wiring
from keyturn.config import load_config
from keyturn.domain.errors import ConfigError, KeyturnError, NotFound
from keyturn.domain.model import CredentialKind, ManagedCredential, SealedSecret
from keyturn.ports import DeployedMaterial

SANDBOX_SA = "sandbox-service-account"


def _secret_id() -> str:
    return f"sec_{uuid.uuid4().hex}"


def _read_bootstrap(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"sandbox bootstrap {path} does not exist; start "
            "`keyturn sandbox serve --state-dir DIR` and pass DIR/bootstrap.json"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"sandbox bootstrap {path} cannot be read as JSON ({exc})") from None
    sa = data.get("service_account") if isinstance(data, dict) else None
    needed = ("token", "credential_id", "credential_uuid", "private_key_pem")
    if not isinstance(data, dict) or not isinstance(data.get("base_url"), str):
        raise ConfigError(
            f"sandbox bootstrap {path} has no base_url; is it a sandbox bootstrap.json?"
        )
    if not isinstance(sa, dict) or any(not isinstance(sa.get(k), str) for k in needed):
        raise ConfigError(
            f"sandbox bootstrap {path}: service_account must have {', '.join(needed)}"
        )
    return data


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


CONFIG_TEMPLATE = """\
# keyturn configuration written by `keyturn init` (paths are relative to this file).

[database]
url = "sqlite:///keyturn.db"

[keys]
master_key_file = "master.key"
retention_days = 30

[worker]
lease_seconds = 30
concurrency = 8
poll_seconds = 1.0
max_attempts = 8
backoff_base_seconds = 0.5
backoff_max_seconds = 30

[providers.sandbox]
base_url = "{base_url}"
timeout_seconds = 10

[credentials.{name}]
kind = "service_account"
provider = "sandbox"
registration = "credentials"
algorithm = "ed25519"

[[credentials.{name}.targets]]
type = "file"
path = "deploy/{name}"
"""


def init_workdir(workdir: Path, bootstrap_path: Path) -> Path:
    boot = _read_bootstrap(bootstrap_path)
    config_path = workdir / "keyturn.toml"
    if config_path.exists():
        raise KeyturnError(f"{config_path} exists already; choose an empty directory")
    keys = CryptoKeys()
    sa = boot["service_account"]
    private_pem = sa["private_key_pem"].encode()
    algorithm = keys.algorithm_of(private_pem)  # validates the key before anything is written

    workdir.mkdir(parents=True, exist_ok=True)
    _write_new(workdir / "master.key", new_master_key() + "\n", 0o600)
    _write_new(
        config_path, CONFIG_TEMPLATE.format(base_url=boot["base_url"], name=SANDBOX_SA), 0o600
    )
    config = load_config(config_path)
    upgrade(config.database.url)
    w = Wiring(config)
    _add(
        w,
        ManagedCredential(
            name=SANDBOX_SA,
            kind=CredentialKind.SERVICE_ACCOUNT,
            provider="sandbox",
            credential_id=sa["credential_id"],
            credential_uuid=sa["credential_uuid"],
            key_ref=None,
            algorithm=algorithm,
        ),
        private_pem,
        sa["token"].encode(),
    )
    material = DeployedMaterial(private_pem, sa["credential_id"], sa["credential_uuid"])
    for target in w.targets_for(SANDBOX_SA):
        target.deploy(material)
    return config_path


def _add(w: Wiring, credential: ManagedCredential, private_pem: bytes, token: bytes | None) -> None:
    vault = w.checked_vault()
    key_ref = _secret_id()
    sealed: list[SealedSecret] = [vault.seal(key_ref, "private_key", private_pem)]
    token_ref = None
    if token is not None:
        token_ref = _secret_id()
        sealed.append(vault.seal(token_ref, "token", token))
    w.store.add_credential(
        ManagedCredential(
            name=credential.name,
            kind=credential.kind,
            provider=credential.provider,
            credential_id=credential.credential_id,
            credential_uuid=credential.credential_uuid,
            key_ref=key_ref,
            algorithm=credential.algorithm,
            token_ref=token_ref,
        ),
        sealed,
    )


def import_credential(
    w: Wiring,
    *,
    name: str,
    kind: CredentialKind,
    provider: str,
    private_key_file: Path,
    credential_id: str,
    credential_uuid: str,
    token_file: Path | None,
) -> None:
    cfg = w.config.credential(name)
    if cfg.kind is not kind:
        raise ConfigError(
            f"--kind {kind.value} does not match [credentials.{name}] kind = {cfg.kind.value}; "
            "make them agree"
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
    try:
        private_pem = private_key_file.read_bytes()
    except OSError as exc:
        raise KeyturnError(
            f"--private-key-file {private_key_file} cannot be read ({exc.strerror})"
        ) from None
    algorithm = CryptoKeys().algorithm_of(private_pem)
    token: bytes | None = None
    if token_file is not None:
        try:
            token = token_file.read_bytes().strip()
        except OSError as exc:
            raise KeyturnError(
                f"--token-file {token_file} cannot be read ({exc.strerror})"
            ) from None
        if not token:
            raise KeyturnError(f"--token-file {token_file} is empty; it must hold the bearer token")
    elif not (cfg.token_env or cfg.token_file):
        raise ConfigError(
            f"credential {name} needs a bearer token: pass --token-file, or set token_env or "
            f"token_file in [credentials.{name}]"
        )
    _add(
        w,
        ManagedCredential(
            name=name,
            kind=kind,
            provider=provider,
            credential_id=credential_id,
            credential_uuid=credential_uuid,
            key_ref=None,
            algorithm=algorithm,
        ),
        private_pem,
        token,
    )


def rotate_master(w: Wiring, new_key_file: Path) -> tuple[int, str]:
    new_key = load_master_key(None, new_key_file)
    old_vault = w.checked_vault()
    new_vault = AesGcmVault(new_key)
    rewrapped = [old_vault.rewrap(s, new_vault) for s in w.store.all_secrets() if s.ciphertext]
    w.store.replace_secrets(rewrapped)
    return len(rewrapped), new_vault.key_id


def deploy_target_for(path: Path) -> FileTarget:
    return FileTarget(f"file:{path}", path)
