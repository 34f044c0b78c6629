"""A service-account rotation deploying to AWS Secrets Manager (a moto server), a Vault KV v2
path (an OpenBao dev server) and local files, run by real worker processes against the
sandbox: what each store holds after success and after a rollback, and after a SIGKILL at
every declared action boundary."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import SA, Kt, kill_worker_at

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from bao_fixture import BaoServer, start_bao
from moto_fixture import AWS_TEST_ENV, MotoServer, free_port, start_moto

from keyturn.adapters.dfns.provider import provider_for
from keyturn.adapters.material import material_from_document
from keyturn.config import load_config
from keyturn.domain.lifecycle import Trigger
from keyturn.engine.registry import discovered
from keyturn.kinds.signing_key import SERVICE_ACCOUNT
from keyturn.plugin import DeployedMaterial, SigningKey, TargetOp

AWS_TARGET, VAULT_TARGET, FILE_TARGET = "aws", "vault", "local-files"
TARGETS = (FILE_TARGET, AWS_TARGET, VAULT_TARGET)
BOUNDARIES = ("before_intent", "after_intent", "after_call", "after_outcome")


def forward_kill_points() -> list[str]:
    points = []
    for trigger, step in SERVICE_ACCOUNT.steps.items():
        if trigger is Trigger.FINISH_ROLLBACK:
            continue
        for action in step.expanded_actions(TARGETS):
            points += [f"{action.phase.value}.{action.name}.{b}" for b in BOUNDARIES]
        points.append(f"transition.{trigger.value}.after_commit")
    return points


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    with pytest.MonkeyPatch.context() as env:
        for k, v in AWS_TEST_ENV.items():
            env.setenv(k, v)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaoServer]:
    server = start_bao(tmp_path_factory.mktemp("bao"))
    try:
        yield server
    finally:
        server.stop()


class Stores:
    """The two remote stores of one working directory, read the way a holder reads them."""

    def __init__(self, moto: MotoServer, bao: BaoServer, secret_id: str, path: str) -> None:
        import boto3

        self.aws = boto3.session.Session(region_name="us-east-1").client(
            "secretsmanager", endpoint_url=moto.url
        )
        self.kv = bao.client()
        self.secret_id, self.path = secret_id, path

    def aws_held(self, stage: str = "AWSCURRENT") -> DeployedMaterial:
        value = self.aws.get_secret_value(SecretId=self.secret_id, VersionStage=stage)
        return material_from_document(value["SecretString"], stage)

    def aws_versions(self) -> int:
        listed = self.aws.list_secret_version_ids(SecretId=self.secret_id, IncludeDeprecated=True)
        return len(listed["Versions"])

    def kv_held(self, version: int | None = None) -> DeployedMaterial:
        read = self.kv.secrets.kv.v2.read_secret_version(
            path=self.path, mount_point="secret", version=version, raise_on_deleted_version=True
        )
        return material_from_document(read["data"]["data"], self.path)

    def kv_version(self) -> int:
        meta = self.kv.secrets.kv.v2.read_secret_metadata(path=self.path, mount_point="secret")
        return int(meta["data"]["current_version"])


def uuid_of(material: DeployedMaterial) -> str:
    return material.credential_uuid


def setup_remote(
    make_kt: Callable[..., Kt], moto: MotoServer, bao: BaoServer, db_url: str | None = None
) -> tuple[Kt, Stores]:
    """A working directory whose service account deploys to the three targets, each holding
    the current (old) key first, as keyturn deployed it."""
    kt = make_kt(db_url)
    secret_id = f"prod/svc-{uuid.uuid4().hex[:10]}"
    path = f"apps/svc-{uuid.uuid4().hex[:10]}"
    with kt.config.open("a") as out:
        out.write(
            f"""
[[credentials.{SA}.targets]]
type = "aws_secrets_manager"
name = "{AWS_TARGET}"
secret_id = "{secret_id}"
endpoint_url = "{moto.url}"

[[credentials.{SA}.targets]]
type = "vault_kv"
name = "{VAULT_TARGET}"
url = "{bao.url}"
path = "{path}"
token_file = "{bao.token_file}"
"""
        )
    old_pem, ids = kt.deployed(SA)
    old = DeployedMaterial(old_pem, ids["credentialId"], ids["credentialUuid"])

    class Pool:
        async def blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
            return await asyncio.to_thread(fn, *args)

    async def seed() -> None:
        for table in load_config(kt.config).credentials[SA].targets[1:]:
            target = discovered().target(table.type).build(table, Pool())  # type: ignore[arg-type]
            await target.stage(old, TargetOp("rot_seed", SA, "stage"))
            await target.promote(old, TargetOp("rot_seed", SA, "promote"))

    asyncio.run(seed())
    return kt, Stores(moto, bao, secret_id, path)


@pytest.fixture
def remote_kt(make_kt: Callable[..., Kt], moto: MotoServer, bao: BaoServer) -> tuple[Kt, Stores]:
    return setup_remote(make_kt, moto, bao)


def worker(kt: Kt, **env: str) -> Any:
    return kt.worker(**AWS_TEST_ENV, **env)


def signs(kt: Kt, material: DeployedMaterial) -> bool:
    """The provider accepts a user action signed with this key."""
    token = kt.bootstrap["service_account"]["token"]

    async def prove() -> bool:
        provider = provider_for(kt.sandbox.base_url, token)
        try:
            await provider.prove(
                signer=SigningKey(material.credential_id, material.private_key_pem)
            )
            return True
        except Exception:
            return False
        finally:
            await provider.aclose()

    return asyncio.run(prove())


def test_three_targets_hold_the_new_key_then_the_old_after_rollback(
    remote_kt: tuple[Kt, Stores],
) -> None:
    kt, stores = remote_kt
    old_file = kt.deployed(SA)
    old_uuid = old_file[1]["credentialUuid"]
    rid = kt.rotate_here()
    assert worker(kt).returncode == 0
    rotation = kt.show_here(rid)
    assert rotation["state"] == "old_deactivated", rotation
    new_uuid = rotation["new_credential_uuid"]

    assert stores.aws_held().credential_uuid == new_uuid
    assert stores.aws_held("AWSPREVIOUS").credential_uuid == old_uuid
    assert stores.aws_versions() == 2  # the seeded one and this rotation's
    assert stores.kv_held().credential_uuid == new_uuid
    assert stores.kv_held(stores.kv_version() - 1).credential_uuid == old_uuid
    assert kt.deployed(SA)[1]["credentialUuid"] == new_uuid
    assert signs(kt, stores.aws_held()) and signs(kt, stores.kv_held())
    assert not kt.provider_credentials()[old_uuid]["isActive"]
    names = [a["name"] for a in rotation["actions"]]
    assert (
        names.index("stage_new@vault")
        < names.index("prove_new")
        < names.index("promote_new@local-files")
    )

    kt.run("rotations", "rollback", rid, "--reason", "e2e rollback", "--yes")
    assert worker(kt).returncode == 0
    assert kt.show_here(rid)["state"] == "rolled_back"
    for held in (stores.aws_held(), stores.kv_held()):
        assert held.credential_uuid == old_uuid
        assert held.private_key_pem.strip() == old_file[0].strip()
    assert kt.deployed(SA)[0] == old_file[0]
    assert stores.aws_versions() == 2  # rollback moved AWSCURRENT back: no new version
    assert signs(kt, stores.aws_held())
    assert kt.provider_credentials()[old_uuid]["isActive"]


def kill_then_finish(kt: Kt, stores: Stores, point: str, marker: Path) -> None:
    old_uuid = kt.deployed(SA)[1]["credentialUuid"]
    before = set(kt.provider_credentials())
    rid = kt.rotate_here()
    kill_worker_at(kt, point, marker)
    finished = worker(kt)
    assert finished.returncode == 0, finished.stderr[-2000:]
    rotation = kt.show_here(rid)
    assert rotation["state"] == "old_deactivated", rotation
    created = set(kt.provider_credentials()) - before
    assert len(created) == 1, created  # exactly one new credential
    new_uuid = rotation["new_credential_uuid"]
    assert created == {new_uuid}
    assert stores.aws_versions() == 2  # one version per rotation
    assert stores.aws_held().credential_uuid == new_uuid
    assert stores.aws_held("AWSPREVIOUS").credential_uuid == old_uuid
    assert stores.kv_held().credential_uuid == new_uuid
    assert kt.deployed(SA)[1]["credentialUuid"] == new_uuid
    assert not kt.provider_credentials()[old_uuid]["isActive"]


@pytest.mark.parametrize("point", forward_kill_points())
def test_kill_at_every_boundary_with_three_targets(
    remote_kt: tuple[Kt, Stores], point: str, tmp_path: Path
) -> None:
    kt, stores = remote_kt
    kill_then_finish(kt, stores, point, tmp_path / "killed-at")


PG_SAMPLE = [
    "forward.stage_new@aws.after_call",
    "forward.promote_new@aws.after_intent",
    "forward.promote_new@vault.after_call",
    "transition.verify.after_commit",
]


@pytest.mark.postgres
@pytest.mark.parametrize("point", PG_SAMPLE)
def test_kill_with_three_targets_on_postgres(
    make_kt: Callable[..., Kt],
    moto: MotoServer,
    bao: BaoServer,
    fresh_pg_url: str,
    point: str,
    tmp_path: Path,
) -> None:
    assert point in forward_kill_points()
    kt, stores = setup_remote(make_kt, moto, bao, fresh_pg_url)
    kill_then_finish(kt, stores, point, tmp_path / "killed-at")


def halt_after_retries(kt: Kt, target_table: str) -> dict[str, Any]:
    """Add a failing target, rotate: the worker retries the step a bounded number of times,
    then halts the rotation for a human."""
    kt.patch_config("max_attempts = 8", "max_attempts = 3")
    with kt.config.open("a") as out:
        out.write(target_table)
    old_uuid = kt.deployed(SA)[1]["credentialUuid"]
    rid = kt.rotate_here()
    worker(kt)
    rotation = kt.show_here(rid)
    assert rotation["state"] == "new_added", rotation
    assert rotation["attempts"] == 3 and rotation["halted_reason"], rotation
    assert "retry budget spent" in rotation["halted_reason"]
    assert kt.provider_credentials()[old_uuid]["isActive"]
    assert kt.deployed(SA)[1]["credentialUuid"] == old_uuid  # nothing was promoted
    return rotation


def test_an_unreachable_target_halts_after_bounded_retries_naming_it(
    make_kt: Callable[..., Kt], moto: MotoServer
) -> None:
    closed = free_port()
    rotation = halt_after_retries(
        make_kt(),
        f"""
[[credentials.{SA}.targets]]
type = "aws_secrets_manager"
name = "aws-down"
secret_id = "prod/unreachable"
endpoint_url = "http://127.0.0.1:{closed}"
""",
    )
    assert "target aws-down" in rotation["halted_reason"]


def test_a_failing_command_target_halts_after_bounded_retries_with_its_last_stderr_line(
    make_kt: Callable[..., Kt], tmp_path: Path
) -> None:
    program = tmp_path / "push-key"
    program.write_text(
        "#!/bin/sh\ncat > /dev/null\necho 'progress...' >&2\n"
        "echo 'the cluster refused the secret: forbidden' >&2\nexit 4\n"
    )
    program.chmod(0o755)
    rotation = halt_after_retries(
        make_kt(),
        f"""
[[credentials.{SA}.targets]]
type = "command"
name = "cluster"
command = ["{program}"]
""",
    )
    reason = rotation["halted_reason"]
    assert "target cluster" in reason and "exited 4" in reason, reason
    assert "the cluster refused the secret: forbidden" in reason
    assert "PRIVATE KEY" not in reason
