"""`keyturn init`: a working directory wired to a local sandbox (validates all of its input
before it writes anything, so bad input changes nothing)."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

from keyturn.adapters.deploy import FileTarget
from keyturn.adapters.keys import CryptoKeys
from keyturn.adapters.secrets_file import ReceiverStateProbe, WebhookSecretsFileTarget
from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.vault import new_master_key
from keyturn.cli.wiring import Wiring
from keyturn.config import load_config
from keyturn.domain.errors import ConfigError, KeyturnError
from keyturn.domain.model import CredentialKind, ManagedCredential, SealedSecret
from keyturn.ports import DeployedMaterial
from keyturn.targets.files import PathConfig

SANDBOX_SA = "sandbox-service-account"
SANDBOX_PAT = "sandbox-pat"
SANDBOX_WEBHOOK = "sandbox-webhook"


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
    needed = ("token", "credential_id", "credential_uuid", "private_key_pem")
    if not isinstance(data, dict) or not isinstance(data.get("base_url"), str):
        raise ConfigError(
            f"sandbox bootstrap {path} has no base_url; is it a sandbox bootstrap.json?"
        )
    for role in ("service_account", "pat"):
        entry = data.get(role)
        if not isinstance(entry, dict) or any(not isinstance(entry.get(k), str) for k in needed):
            raise ConfigError(f"sandbox bootstrap {path}: {role} must have {', '.join(needed)}")
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

[credentials.{sa}]
kind = "service_account"
provider = "sandbox"
registration = "credentials"
algorithm = "ed25519"

[[credentials.{sa}.targets]]
type = "file"
name = "local-files"
path = "deploy/{sa}"

[credentials.{pat}]
kind = "pat"
provider = "sandbox"
registration = "credentials"
algorithm = "ecdsa-p256"

[[credentials.{pat}.targets]]
type = "file"
name = "local-files"
path = "deploy/{pat}"

# The webhook's secret rotates by replacing the webhook; calls are signed by {sa}.
[credentials.{webhook}]
kind = "webhook"
provider = "sandbox"
signer = "{sa}"
grace_seconds = 2

[[credentials.{webhook}.targets]]
type = "secrets_file"
path = "deploy/{webhook}/secrets.json"

[[credentials.{webhook}.probes]]
type = "receiver"
url = "{receiver_url}"
"""

DEFAULT_RECEIVER_URL = "http://127.0.0.1:8091"


def init_workdir(
    workdir: Path, bootstrap_path: Path, receiver_url: str = DEFAULT_RECEIVER_URL
) -> Path:
    """Config, master key, migrated database; the sandbox's service account and PAT managed as
    sandbox-service-account and sandbox-pat; a webhook created on the sandbox pointing at the
    receiver at `receiver_url` (POST {receiver_url}/webhooks), managed as sandbox-webhook."""
    boot = _read_bootstrap(bootstrap_path)
    receiver_url = receiver_url.rstrip("/")
    if not receiver_url.startswith(("http://", "https://")):
        raise ConfigError(f"--receiver-url {receiver_url!r} must be an http:// or https:// URL")
    config_path = workdir / "keyturn.toml"
    if config_path.exists():
        raise KeyturnError(f"{config_path} exists already; choose an empty directory")
    keys = CryptoKeys()
    sa, pat = boot["service_account"], boot["pat"]
    sa_pem, pat_pem = sa["private_key_pem"].encode(), pat["private_key_pem"].encode()
    sa_alg = keys.algorithm_of(sa_pem)  # validates both keys before anything is written
    pat_alg = keys.algorithm_of(pat_pem)

    workdir.mkdir(parents=True, exist_ok=True)
    _write_new(workdir / "master.key", new_master_key() + "\n", 0o600)
    text = CONFIG_TEMPLATE.format(
        base_url=boot["base_url"],
        sa=SANDBOX_SA,
        pat=SANDBOX_PAT,
        webhook=SANDBOX_WEBHOOK,
        receiver_url=receiver_url,
    )
    _write_new(config_path, text, 0o600)
    config = load_config(config_path)
    upgrade(config.database.url)
    w = Wiring(config)
    for name, kind, entry, pem, alg in (
        (SANDBOX_SA, CredentialKind.SERVICE_ACCOUNT, sa, sa_pem, sa_alg),
        (SANDBOX_PAT, CredentialKind.PAT, pat, pat_pem, pat_alg),
    ):
        _add(
            w,
            ManagedCredential(
                name=name,
                kind=kind,
                provider="sandbox",
                credential_id=entry["credential_id"],
                credential_uuid=entry["credential_uuid"],
                key_ref=None,
                algorithm=alg,
            ),
            pem,
            entry["token"].encode(),
        )
        material = DeployedMaterial(pem, entry["credential_id"], entry["credential_uuid"])
        for target in w.config.credential(name).targets:
            assert isinstance(target, PathConfig)
            FileTarget(name, target.path).deploy(material, name)
    asyncio.run(_create_webhook(w, boot, sa_pem, f"{receiver_url}/webhooks"))
    return config_path


def enable_webhook_when_loaded(config_path: Path, *, timeout: float = 10.0) -> str | None:
    """Enable sandbox-webhook once the receiver reports the secret deployed for it: None when
    enabled (or enabled already), else why it stays disabled (one line, with what to do).
    A receiver that does not answer is not waited for."""
    config = load_config(config_path)
    w = Wiring(config)
    managed = w.store.get_credential(SANDBOX_WEBHOOK)
    probe_cfg = config.credential(SANDBOX_WEBHOOK).probes[0]
    url = str(getattr(probe_cfg, "url", ""))
    version = None
    for target in config.credential(SANDBOX_WEBHOOK).targets:
        assert isinstance(target, PathConfig)
        version = WebhookSecretsFileTarget(SANDBOX_WEBHOOK, target.path).read_back()[0]
    probe = ReceiverStateProbe("receiver", url)
    try:
        probe.wait_for_version(str(version), timeout=timeout)
    except KeyturnError as exc:
        return (
            f"webhook {managed.credential_id} stays disabled, so no event is rejected: {exc}. "
            f"Start the receiver (`keyturn receiver serve --secrets "
            f"{config_path.parent / 'deploy' / SANDBOX_WEBHOOK / 'secrets.json'}`), then run "
            f"`keyturn init {config_path.parent} --enable-webhook`"
        )
    asyncio.run(_set_enabled(w, managed.credential_id))
    return None


async def _set_enabled(w: Wiring, webhook_id: str) -> None:
    from keyturn.plugin import dfns_webhook_session

    session = await w.provider_session(dfns_webhook_session, SANDBOX_SA, with_key=True)
    try:
        await session.set_enabled(webhook_id, True)
    finally:
        await session.aclose()


async def _create_webhook(w: Wiring, boot: dict[str, Any], sa_pem: bytes, url: str) -> None:
    from keyturn.adapters.dfns.client import DfnsClient
    from keyturn.adapters.dfns.signing import KeySigner

    sa = boot["service_account"]
    signer = KeySigner.from_pem(sa["credential_id"], sa_pem)
    async with DfnsClient(boot["base_url"], sa["token"], signer=signer) as client:
        # disabled until the receiver holds its secret: events before that would be rejected
        webhook, secret = await client.create_webhook(
            url, ["*"], description=f"managed by keyturn as {SANDBOX_WEBHOOK}", status="Disabled"
        )
    vault = w.checked_vault()
    ref = _secret_id()
    w.store.add_credential(
        ManagedCredential(
            name=SANDBOX_WEBHOOK,
            kind=CredentialKind.WEBHOOK,
            provider="sandbox",
            credential_id=webhook.id,
            credential_uuid=webhook.id,
            key_ref=ref,
            algorithm="hmac-sha256",
        ),
        [vault.seal(ref, "webhook_secret", secret.reveal().encode())],
    )
    for target in w.config.credential(SANDBOX_WEBHOOK).targets:
        assert isinstance(target, PathConfig)
        WebhookSecretsFileTarget(SANDBOX_WEBHOOK, target.path).deploy([secret.reveal()])


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
