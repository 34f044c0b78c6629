"""The vault_kv target against a real OpenBao dev server (KV v2 at secret/): the stage /
promote / rollback cycle with real keys, idempotency (a repeated call adds no KV version and
touches no metadata), ownership (adopt), check-and-set conflicts, AppRole login, and the
errors of a sealed or stopped server (retryable, naming the target, no key or token in them).

One server per module (per xdist worker), each test on its own paths.
"""

from __future__ import annotations

import asyncio
import json
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import hvac
import pytest
import requests
from bao_fixture import INSTALL_HINT, BaoServer, bao_binary, start_bao
from hvac.api.secrets_engines.kv_v2 import KvV2
from pydantic import ValidationError

from keyturn.adapters.keys import CryptoKeys
from keyturn.adapters.material import material_document, same_material
from keyturn.plugin import DeployedMaterial, StepError, TargetOp
from keyturn.targets.vault_kv import VAULT_KV

T = TypeVar("T")
CREDENTIAL = "signer"
ADOPT_HINT = (
    f"set adopt = true in its [[credentials.{CREDENTIAL}.targets]] table to let keyturn take "
    "it over"
)
KEYS = CryptoKeys()


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaoServer]:
    if bao_binary() is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    server = start_bao(tmp_path_factory.mktemp("bao"))
    yield server
    server.stop()


@pytest.fixture
def approle(bao: BaoServer, tmp_path: Path) -> Callable[[str], dict[str, Any]]:
    """Enables AppRole (once per server) and returns a maker: for a KV path, a policy with
    exactly the capabilities the README documents, a role with it, and the target table's
    auth keys (the secret id in a file)."""
    root = bao.client()
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")

    def make(path: str) -> dict[str, Any]:
        name = f"keyturn-{uuid.uuid4().hex[:12]}"
        rules = "\n".join(
            f'path "secret/{kind}/{p}" {{ capabilities = ["create", "read", "update"] }}'
            for p in (path, f"{path}-pending")
            for kind in ("data", "metadata")
        )
        root.sys.create_or_update_policy(name, rules)
        root.auth.approle.create_or_update_approle(name, token_policies=[name], token_ttl="10m")
        role_id = root.auth.approle.read_role_id(name)["data"]["role_id"]
        secret_id = root.auth.approle.generate_secret_id(name)["data"]["secret_id"]
        secret_file = tmp_path / f"{name}.secret-id"
        secret_file.write_text(secret_id + "\n", encoding="utf-8")
        return {
            "auth": "approle",
            "role_id": role_id,
            "secret_id_file": str(secret_file),
            "_secret_id": secret_id,
            "_policy": name,
        }

    return make


# -------------------------------------------------------------------------------- helpers


class ThreadServices:
    """The one service a target uses: blocking calls in a thread."""

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)


def unique_path() -> str:
    return f"keyturn-tests/{uuid.uuid4().hex[:16]}/signer"


def new_material(credential_id: str) -> DeployedMaterial:
    key = KEYS.generate("ed25519")
    return DeployedMaterial(key.private_pem, credential_id, str(uuid.uuid4()))


def vault_target(bao: BaoServer, path: str, **table: Any) -> Any:
    keys = {"type": "vault_kv", "url": bao.url, "path": path}
    if "auth" not in table and "token_env" not in table:
        keys["token_file"] = str(bao.token_file)
    config = VAULT_KV.config_model.model_validate({**keys, **table})
    return VAULT_KV.build(config, ThreadServices())


def op(rotation: str, phase: str) -> TargetOp:
    return TargetOp(rotation_id=rotation, credential=CREDENTIAL, phase=phase)


def metadata(bao: BaoServer, path: str) -> dict[str, Any] | None:
    """The KV metadata of `path` (current_version, versions, custom_metadata, updated_time)."""
    try:
        return dict(bao.client().secrets.kv.v2.read_secret_metadata(path)["data"])
    except hvac.exceptions.InvalidPath:
        return None


def document(bao: BaoServer, path: str, version: int | None = None) -> dict[str, Any]:
    read = bao.client().secrets.kv.v2.read_secret_version(
        path, version=version, raise_on_deleted_version=True
    )
    return dict(read["data"]["data"])


def version_of(bao: BaoServer, path: str) -> int:
    meta = metadata(bao, path)
    return 0 if meta is None else int(meta["current_version"])


def secret_fragments(*materials: DeployedMaterial) -> list[str]:
    """Pieces of key material that must never appear in a message (the PEM's base64 lines)."""
    return [
        line
        for m in materials
        for line in m.private_key_pem.decode().splitlines()
        if line and not line.startswith("-----")
    ]


def assert_clean(exc: BaseException, *secrets: str) -> None:
    """Neither the message nor the whole printed traceback holds any of `secrets`."""
    printed = "".join(traceback.format_exception(exc))
    for secret in secrets:
        assert secret not in printed


# ------------------------------------------------------------------------------ the cycle


@pytest.mark.anyio
async def test_stage_promote_rollback_with_real_keys(bao: BaoServer) -> None:
    path = unique_path()
    pending = f"{path}-pending"
    target = vault_target(bao, path)
    assert target.name == f"vault_kv:secret/{path}"
    old, new = new_material("cred-old"), new_material("cred-new")

    # The old key, deployed by an earlier rotation onto a path that did not exist (cas=0).
    await target.stage(old, op("rot-1", "stage"))
    first = await target.promote(old, op("rot-1", "promote"))
    assert first["changed"] is True
    assert (first["version"], first["previous_version"]) == (1, 0)

    # stage: the pending path gets the new key; readers of the main path still see the old.
    main_before = metadata(bao, path)
    staged = await target.stage(new, op("rot-2", "stage"))
    assert staged["changed"] is True
    assert document(bao, path) == material_document(old)
    assert same_material(await target.read_back(), old)
    assert document(bao, pending) == material_document(new)
    assert same_material(await target.read_back(staged=True), new)
    assert metadata(bao, path) == main_before  # stage did not touch the main path
    pending_meta = metadata(bao, pending)
    assert pending_meta is not None
    assert pending_meta["custom_metadata"] == {
        "managed-by": "keyturn",
        "keyturn-credential": CREDENTIAL,
        "keyturn-rotation": "rot-2",
    }
    again = await target.stage(new, op("rot-2", "stage"))
    assert again["changed"] is False
    assert metadata(bao, pending) == pending_meta  # no version, no metadata write

    # promote: the main path's new version holds the new key, the one before it the old.
    promoted = await target.promote(new, op("rot-2", "promote"))
    assert promoted["changed"] is True
    assert (promoted["version"], promoted["previous_version"]) == (2, 1)
    assert document(bao, path) == material_document(new)
    assert document(bao, path, version=1) == material_document(old)
    assert same_material(await target.read_back(), new)
    main_meta = metadata(bao, path)
    assert main_meta is not None
    assert main_meta["custom_metadata"]["keyturn-rotation"] == "rot-2"
    assert main_meta["custom_metadata"]["managed-by"] == "keyturn"
    assert (await target.promote(new, op("rot-2", "promote")))["changed"] is False
    assert metadata(bao, path) == main_meta

    # rollback: the old key again, as a new version; nothing is deleted.
    rolled = await target.rollback(old, op("rot-2", "rollback"))
    assert rolled["changed"] is True
    assert (rolled["version"], rolled["previous_version"]) == (3, 2)
    assert document(bao, path) == material_document(old)
    assert document(bao, path, version=2) == material_document(new)
    assert same_material(await target.read_back(), old)
    rolled_meta = metadata(bao, path)
    assert (await target.rollback(old, op("rot-2", "rollback")))["changed"] is False
    assert metadata(bao, path) == rolled_meta
    assert document(bao, pending) == material_document(new)  # the pending path is kept
    assert version_of(bao, pending) == 2


@pytest.mark.anyio
async def test_promote_refuses_material_that_is_not_staged(bao: BaoServer) -> None:
    path = unique_path()
    target = vault_target(bao, path)
    staged, other = new_material("cred-a"), new_material("cred-b")
    await target.stage(staged, op("rot-1", "stage"))
    with pytest.raises(StepError) as caught:
        await target.promote(other, op("rot-1", "promote"))
    assert caught.value.retryable is False
    assert str(caught.value).startswith(f"target {target.name}: ")
    assert "does not hold the key to promote" in str(caught.value)
    assert version_of(bao, path) == 0
    assert_clean(caught.value, *secret_fragments(staged, other), bao.root_token)


@pytest.mark.anyio
async def test_pending_path_option_and_token_env(
    bao: BaoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = unique_path()
    monkeypatch.setenv("KEYTURN_TEST_BAO_TOKEN", bao.root_token)
    target = vault_target(
        bao, path, token_env="KEYTURN_TEST_BAO_TOKEN", pending_path=f"{path}/next"
    )
    key = new_material("cred-a")
    await target.stage(key, op("rot-1", "stage"))
    assert document(bao, f"{path}/next") == material_document(key)
    assert version_of(bao, f"{path}-pending") == 0
    await target.promote(key, op("rot-1", "promote"))
    assert document(bao, path) == material_document(key)


# ------------------------------------------------------------------------------ ownership


@pytest.mark.anyio
async def test_main_path_not_written_by_keyturn_is_refused_unless_adopted(
    bao: BaoServer,
) -> None:
    path = unique_path()
    root = bao.client().secrets.kv.v2
    root.create_or_update_secret(path, secret={"password": "hunter2-not-keyturn"})
    root.update_metadata(path, custom_metadata={"owner": "team-a"})
    before = metadata(bao, path)
    key = new_material("cred-a")

    target = vault_target(bao, path)
    await target.stage(key, op("rot-1", "stage"))  # the pending path is free: staged
    with pytest.raises(StepError) as caught:
        await target.promote(key, op("rot-1", "promote"))
    message = str(caught.value)
    assert caught.value.retryable is False
    assert message.startswith(f"target {target.name}: secret/{path} exists and is not managed")
    assert message.endswith(ADOPT_HINT)
    assert "\n" not in message
    assert_clean(caught.value, "hunter2-not-keyturn", *secret_fragments(key), bao.root_token)
    assert metadata(bao, path) == before  # untouched: no version, no marks
    assert document(bao, path) == {"password": "hunter2-not-keyturn"}
    with pytest.raises(StepError, match="exists and is not managed"):
        await target.rollback(key, op("rot-1", "rollback"))
    assert metadata(bao, path) == before

    adopted = vault_target(bao, path, adopt=True)
    detail = await adopted.promote(key, op("rot-1", "promote"))
    assert detail["changed"] is True
    assert document(bao, path) == material_document(key)
    assert document(bao, path, version=1) == {"password": "hunter2-not-keyturn"}
    meta = metadata(bao, path)
    assert meta is not None
    assert meta["custom_metadata"] == {
        "owner": "team-a",  # someone else's metadata is kept
        "managed-by": "keyturn",
        "keyturn-credential": CREDENTIAL,
        "keyturn-rotation": "rot-1",
    }
    # Taken over: the target without adopt manages it from now on.
    assert (await target.promote(key, op("rot-1", "promote")))["changed"] is False


@pytest.mark.anyio
async def test_pending_path_of_someone_else_is_refused(bao: BaoServer) -> None:
    path = unique_path()
    root = bao.client().secrets.kv.v2
    root.create_or_update_secret(f"{path}-pending", secret={"note": "mine"})
    target = vault_target(bao, path)
    with pytest.raises(StepError) as caught:
        await target.stage(new_material("cred-a"), op("rot-1", "stage"))
    assert caught.value.retryable is False
    assert str(caught.value).endswith(ADOPT_HINT)
    assert version_of(bao, f"{path}-pending") == 1


@pytest.mark.anyio
async def test_path_managed_for_another_credential_is_refused(bao: BaoServer) -> None:
    path = unique_path()
    key = new_material("cred-a")
    theirs = vault_target(bao, path)
    await theirs.stage(key, TargetOp("rot-1", "other-credential", "stage"))
    await theirs.promote(key, TargetOp("rot-1", "other-credential", "promote"))
    with pytest.raises(StepError) as caught:
        await vault_target(bao, path).stage(new_material("cred-b"), op("rot-2", "stage"))
    assert "managed by keyturn for credential 'other-credential'" in str(caught.value)
    assert str(caught.value).endswith(ADOPT_HINT)
    assert document(bao, f"{path}-pending") == material_document(key)


@pytest.mark.anyio
async def test_read_back_of_a_foreign_document_names_no_content(bao: BaoServer) -> None:
    path = unique_path()
    bao.client().secrets.kv.v2.create_or_update_secret(
        path, secret={"private_key": "SECRET-VALUE-123"}
    )
    target = vault_target(bao, path)
    with pytest.raises(StepError) as caught:
        await target.read_back()
    assert str(caught.value).startswith(f"target {target.name}: secret/{path} lacks")
    assert_clean(caught.value, "SECRET-VALUE-123")
    with pytest.raises(StepError, match="holds no key"):
        await target.read_back(staged=True)


# --------------------------------------------------------------------- check-and-set race


@pytest.mark.anyio
async def test_a_write_in_between_is_a_retryable_conflict(
    bao: BaoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = unique_path()
    target = vault_target(bao, path)
    old, new, theirs = new_material("old"), new_material("new"), new_material("theirs")
    await target.stage(old, op("rot-1", "stage"))
    await target.promote(old, op("rot-1", "promote"))
    await target.stage(new, op("rot-2", "stage"))

    write = KvV2.create_or_update_secret
    root = bao.client().secrets.kv.v2
    raced: list[int] = []

    def someone_writes_first(self: Any, at: str, *args: Any, **kwargs: Any) -> Any:
        # Another writer gets in between keyturn's read of the main path and its write.
        if at == path and not raced:
            raced.append(write(root, path, secret=material_document(theirs))["data"]["version"])
        return write(self, at, *args, **kwargs)

    monkeypatch.setattr(KvV2, "create_or_update_secret", someone_writes_first)
    with pytest.raises(StepError) as caught:
        await target.promote(new, op("rot-2", "promote"))
    assert raced == [2]
    assert caught.value.retryable is True
    assert str(caught.value).startswith(f"target {target.name}: secret/{path} changed")
    assert_clean(caught.value, *secret_fragments(old, new, theirs), bao.root_token)
    assert document(bao, path) == material_document(theirs)  # nothing overwritten
    assert version_of(bao, path) == 2

    monkeypatch.undo()
    retried = await target.promote(new, op("rot-2", "promote"))  # the path is keyturn's
    assert (retried["changed"], retried["version"]) == (True, 3)
    assert document(bao, path) == material_document(new)


# --------------------------------------------------------------------------------- AppRole


def _revoke_tokens_of(bao: BaoServer, policy: str) -> int:
    root = bao.client()
    revoked = 0
    for accessor in root.list("auth/token/accessors")["data"]["keys"]:
        token = root.auth.token.lookup_accessor(accessor)["data"]
        if policy in (token.get("policies") or []):
            root.auth.token.revoke_accessor(accessor)
            revoked += 1
    return revoked


@pytest.mark.anyio
async def test_approle_login_with_the_documented_policy(
    bao: BaoServer, approle: Callable[[str], dict[str, Any]]
) -> None:
    path = unique_path()
    auth = approle(path)
    secret_id, policy = auth.pop("_secret_id"), auth.pop("_policy")
    target = vault_target(bao, path, **auth)
    old, new = new_material("old"), new_material("new")

    await target.stage(old, op("rot-1", "stage"))
    await target.promote(old, op("rot-1", "promote"))
    await target.stage(new, op("rot-2", "stage"))
    await target.promote(new, op("rot-2", "promote"))
    await target.rollback(old, op("rot-2", "rollback"))
    assert same_material(await target.read_back(), old)
    assert same_material(await target.read_back(staged=True), new)
    assert version_of(bao, path) == 3

    # Its token revoked (expired): the target logs in again once and carries on.
    assert _revoke_tokens_of(bao, policy) == 1
    assert (await target.promote(old, op("rot-2", "rollback")))["changed"] is False
    assert _revoke_tokens_of(bao, policy) == 1  # a new token was issued

    # A path outside its policy: permission denied, not retryable, with the fix.
    elsewhere = vault_target(bao, unique_path(), **auth)
    with pytest.raises(StepError) as caught:
        await elsewhere.stage(new, op("rot-3", "stage"))
    assert caught.value.retryable is False
    assert str(caught.value).startswith(f"target {elsewhere.name}: stage at {bao.url}")
    assert "permission denied" in str(caught.value)
    assert "policy needs create, read and update" in str(caught.value)
    assert_clean(caught.value, secret_id, *secret_fragments(old, new))

    # A wrong secret id: the login is refused.
    wrong = Path(auth["secret_id_file"])
    await asyncio.to_thread(wrong.write_text, "not-the-secret-id\n", encoding="utf-8")
    with pytest.raises(StepError) as caught:
        await vault_target(bao, path, **auth).read_back()
    assert caught.value.retryable is False
    assert "AppRole login at auth/approle was refused" in str(caught.value)
    assert_clean(caught.value, secret_id, "not-the-secret-id")


# ------------------------------------------------------------------- interrupted writes


@pytest.mark.anyio
async def test_a_promote_stopped_before_its_marks_is_finished_or_rolled_back(
    bao: BaoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KV writes the data and the custom metadata in two calls: a promote that wrote a new
    path's data but lost the connection before its marks leaves keyturn's key unmarked. Its
    retry marks it without a new version; a rollback instead recognises keyturn's own write
    (the staged content) and is not refused."""
    old, new = new_material("old"), new_material("new")
    set_marks = KvV2.update_metadata

    def connection_lost(self: Any, at: str, *args: Any, **kwargs: Any) -> Any:
        if not at.endswith("-pending"):
            raise requests.exceptions.ConnectionError("connection reset by peer")
        return set_marks(self, at, *args, **kwargs)

    for then in ("retry", "rollback"):
        path = unique_path()
        target = vault_target(bao, path)
        await target.stage(new, op("rot-1", "stage"))
        monkeypatch.setattr(KvV2, "update_metadata", connection_lost)
        with pytest.raises(StepError, match="cannot reach Vault") as caught:
            await target.promote(new, op("rot-1", "promote"))
        monkeypatch.undo()
        assert caught.value.retryable is True
        meta = metadata(bao, path)
        assert meta is not None
        assert (meta["current_version"], meta["custom_metadata"]) == (1, None)

        if then == "retry":
            detail = await target.promote(new, op("rot-1", "promote"))
            assert (detail["changed"], detail["version"]) == (False, 1)
        else:
            detail = await target.rollback(old, op("rot-1", "rollback"))
            assert (detail["changed"], detail["version"]) == (True, 2)
            assert document(bao, path) == material_document(old)
        marked = metadata(bao, path)
        assert marked is not None
        assert marked["custom_metadata"]["managed-by"] == "keyturn"
        assert marked["custom_metadata"]["keyturn-credential"] == CREDENTIAL


# ------------------------------------------------------------------------- server errors


class EchoingProxy:
    """A broken proxy in front of Vault: the mount is KV v2, KV reads find nothing (404), every
    write is answered with `status` and an error that quotes the request body back (which holds
    the key) and the token."""

    def __init__(self, status: int) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, errors: list[str]) -> None:
                body = json.dumps({"errors": errors}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.startswith("/v1/sys/internal/ui/mounts/"):
                    mount = {"path": "secret/", "type": "kv", "options": {"version": "2"}}
                    body = json.dumps({"data": mount}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self._answer(404, [])

            def do_POST(self) -> None:
                sent = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                token = self.headers.get("X-Vault-Token", "")
                self._answer(proxy.status, [f"bad request {sent.decode()} token {token}"])

            do_PUT = do_POST

        self.status = status
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "retryable"), [(400, False), (403, False), (502, True)])
async def test_error_bodies_are_never_quoted(bao: BaoServer, status: int, retryable: bool) -> None:
    proxy = EchoingProxy(status)
    try:
        target = vault_target(bao, unique_path(), url=proxy.url)
        key = new_material("cred-a")
        with pytest.raises(StepError) as caught:
            await target.stage(key, op("rot-1", "stage"))
        assert caught.value.retryable is retryable
        assert str(caught.value).startswith(f"target {target.name}: stage at {proxy.url}: ")
        assert f"HTTP {status}" in str(caught.value) or "BadGateway" in str(caught.value)
        assert_clean(caught.value, *secret_fragments(key), bao.root_token)
    finally:
        proxy.close()


@pytest.mark.anyio
async def test_a_mount_that_is_not_kv_v2_is_refused_before_any_write(bao: BaoServer) -> None:
    missing = vault_target(bao, unique_path(), mount="no-such-mount")
    with pytest.raises(StepError) as caught:
        await missing.stage(new_material("cred-a"), op("rot-1", "stage"))
    assert caught.value.retryable is False
    assert "cannot look up the mount no-such-mount/" in str(caught.value)

    # On KV version 1 the KV v2 calls would "work", writing keys named data/... and metadata/...
    kv1 = f"kv1-{uuid.uuid4().hex[:8]}"
    root = bao.client()
    root.sys.enable_secrets_engine("kv", path=kv1, options={"version": "1"})
    with pytest.raises(StepError) as caught:
        await vault_target(bao, "apps/signer", mount=kv1).stage(
            new_material("cred-a"), op("rot-1", "stage")
        )
    assert caught.value.retryable is False
    assert f"{kv1}/ is not the path of a KV version 2 engine (found a kv version 1" in str(
        caught.value
    )
    with pytest.raises(hvac.exceptions.InvalidPath):  # nothing was written: no key to list
        root.secrets.kv.v1.list_secrets("", mount_point=kv1)


# ---------------------------------------------------------------------- sealed, stopped


@pytest.mark.anyio
async def test_sealed_then_stopped_server_is_retryable_and_names_no_secret(
    tmp_path: Path,
) -> None:
    if bao_binary() is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    server = start_bao(tmp_path / "bao-down")
    try:
        path = unique_path()
        target = vault_target(server, path)
        key = new_material("cred-a")
        await target.stage(key, op("rot-1", "stage"))
        secrets = [*secret_fragments(key), server.root_token, key.private_key_pem.decode()]

        server.client().sys.seal()
        with pytest.raises(StepError) as sealed:
            await target.promote(key, op("rot-1", "promote"))
        assert sealed.value.retryable is True
        assert str(sealed.value).startswith(f"target {target.name}: promote at {server.url}")
        assert "sealed" in str(sealed.value)
        assert_clean(sealed.value, *secrets)

        server.stop()
        for call in (
            lambda: target.promote(key, op("rot-1", "promote")),
            lambda: target.stage(key, op("rot-1", "stage")),
            lambda: target.read_back(),
        ):
            with pytest.raises(StepError) as down:
                await call()
            assert down.value.retryable is True
            assert str(down.value).startswith(f"target {target.name}: ")
            assert "cannot reach Vault" in str(down.value)
            assert_clean(down.value, *secrets)
    finally:
        server.stop()


# ------------------------------------------------------------------------- configuration


def _table(**keys: Any) -> dict[str, Any]:
    return {"type": "vault_kv", "url": "https://vault.example:8200", "path": "apps/signer", **keys}


def test_config_defaults() -> None:
    config = VAULT_KV.config_model.model_validate(_table(token_env="VAULT_TOKEN"))
    target = VAULT_KV.build(config, ThreadServices())
    assert target.name == "vault_kv:secret/apps/signer"
    assert config.pending == "apps/signer-pending"
    assert (config.mount, config.timeout_seconds, config.adopt) == ("secret", 10, False)
    named = VAULT_KV.config_model.model_validate(
        _table(name="signer-kv", mount="/kv/", path="/a/b/", token_env="T")
    )
    assert VAULT_KV.build(named, ThreadServices()).name == "signer-kv"
    assert (named.mount, named.path) == ("kv", "a/b")
    assert VAULT_KV.type == "vault_kv"
    assert VAULT_KV.accepts == frozenset({"signing_key"})


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({}, 'auth = "token" needs exactly one of token_env'),
        ({"token_env": "A", "token_file": "t"}, 'auth = "token" needs exactly one of token_env'),
        ({"token": "s.xyz"}, "token is never written in the configuration"),
        ({"auth": "approle", "role_id": "r", "secret_id": "s"}, "secret_id is never written"),
        ({"auth": "approle", "role_id": "r"}, 'auth = "approle" needs role_id and exactly one'),
        ({"auth": "approle", "secret_id_env": "S"}, 'auth = "approle" needs role_id'),
        (
            {"auth": "approle", "role_id": "r", "secret_id_env": "S", "token_env": "T"},
            'token_env is for auth = "token"',
        ),
        ({"token_env": "T", "role_id": "r"}, 'role_id is for auth = "approle"'),
        ({"token_env": "T", "auth": "ldap"}, "Input should be 'token' or 'approle'"),
        ({"token_env": "T", "pending_path": "apps/signer"}, "pending_path must differ"),
        ({"token_env": "T", "url": "vault:8200"}, "url must start with https://"),
        ({"token_env": "T", "path": "a/../b"}, "is not a KV path"),
        ({"token_env": "T", "timeout_seconds": 0}, "greater than 0"),
    ],
)
def test_config_refuses_bad_combinations_in_one_line(keys: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError) as caught:
        VAULT_KV.config_model.model_validate(_table(**keys))
    first = caught.value.errors()[0]["msg"]
    assert expected in first
    assert "\n" not in first
