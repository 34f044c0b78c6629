"""WebhookSecretsFileTarget (atomic 0600 file the receiver reads) and ReceiverStateProbe."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import httpx
import pytest

from keyturn.adapters.secrets_file import ReceiverStateProbe, WebhookSecretsFileTarget
from keyturn.domain.errors import KeyturnError
from keyturn.ports import SecretsProbe, SecretsTarget
from keyturn.testing.secret_scan import scan_bytes
from keyturn.webhooks import SecretsFile


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


OLD = "whs-" + "5e" * 20
NEW = "whs-" + "7f" * 20


def expected_version(secrets: list[str]) -> str:
    canonical = json.dumps(sorted(set(secrets)), separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def test_deploy_writes_the_documented_format_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "receiver" / "secrets.json"
    target = WebhookSecretsFileTarget("hooks", path)
    version = target.deploy([OLD, NEW])
    assert version == expected_version([OLD, NEW])
    document = json.loads(path.read_text())
    assert document["version"] == version
    assert document["secrets"] == [OLD, NEW]
    assert document["updated_at"].endswith("+00:00")
    assert set(document) == {"version", "secrets", "updated_at"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # created by the target
    assert [p.name for p in path.parent.iterdir()] == ["secrets.json"]  # no temp file left


def test_the_version_does_not_depend_on_order(tmp_path: Path) -> None:
    target = WebhookSecretsFileTarget("hooks", tmp_path / "secrets.json")
    first = target.deploy([OLD, NEW])
    assert target.deploy([NEW, OLD]) == first
    assert target.read_back() == (first, (NEW, OLD))
    assert target.deploy([NEW]) != first


def test_deploy_drops_duplicates(tmp_path: Path) -> None:
    target = WebhookSecretsFileTarget("hooks", tmp_path / "secrets.json")
    version = target.deploy([OLD, OLD, NEW])
    assert target.read_back() == (version, (OLD, NEW))


def test_deploy_replaces_atomically_and_skips_identical_content(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    target = WebhookSecretsFileTarget("hooks", path)
    target.deploy([OLD])
    first = path.stat()
    target.deploy([OLD])  # idempotent: untouched, so the receiver does not reload for nothing
    again = path.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    target.deploy([OLD, NEW])
    changed = path.stat()
    assert changed.st_ino != first.st_ino  # a new file renamed over the old one
    assert stat.S_IMODE(changed.st_mode) == 0o600


def test_deploy_repairs_a_file_with_loose_permissions(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    target = WebhookSecretsFileTarget("hooks", path)
    target.deploy([OLD])
    path.chmod(0o644)
    target.deploy([OLD])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_receiver_reads_what_the_target_writes(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    target = WebhookSecretsFileTarget("hooks", path)
    version = target.deploy([OLD])
    source = SecretsFile(path)
    assert source.snapshot() == (version, (OLD,))
    both = target.deploy([OLD, NEW])
    assert source.snapshot() == (both, (OLD, NEW))
    only_new = target.deploy([NEW])
    assert source.snapshot() == (only_new, (NEW,))


@pytest.mark.parametrize(
    ("secrets", "fragment"),
    [
        ([], "empty list"),
        ([OLD, ""], "#2 is empty"),
        ([OLD, "   "], "#2 is empty"),
    ],
)
def test_bad_input_is_refused_and_leaves_the_file(
    tmp_path: Path, secrets: list[str], fragment: str
) -> None:
    path = tmp_path / "secrets.json"
    target = WebhookSecretsFileTarget("hooks", path)
    version = target.deploy([NEW])
    with pytest.raises(KeyturnError) as caught:
        target.deploy(secrets)
    message = str(caught.value)
    assert message.startswith("deploy target hooks: ")
    assert fragment in message
    assert "\n" not in message
    assert scan_bytes(message, {"old": OLD, "new": NEW}) == []
    assert target.read_back() == (version, (NEW,))


def test_a_single_string_is_refused(tmp_path: Path) -> None:
    target = WebhookSecretsFileTarget("hooks", tmp_path / "secrets.json")
    with pytest.raises(KeyturnError, match="not one string"):
        target.deploy(OLD)


def test_read_back_of_a_missing_file(tmp_path: Path) -> None:
    target = WebhookSecretsFileTarget("hooks", tmp_path / "secrets.json")
    with pytest.raises(KeyturnError, match="is missing; deploy the webhook secrets"):
        target.read_back()


@pytest.mark.parametrize(
    "content",
    [b"{", b"[]", b'{"version": "x"}', json.dumps({"secrets": [OLD, 3]}).encode()],
    ids=["torn", "array", "no-secrets", "number"],
)
def test_read_back_of_an_invalid_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "secrets.json"
    path.write_bytes(content)
    with pytest.raises(KeyturnError) as caught:
        WebhookSecretsFileTarget("hooks", path).read_back()
    message = str(caught.value)
    assert "deploy the webhook secrets again" in message
    assert "\n" not in message
    assert OLD not in message


def test_read_back_refuses_a_version_that_does_not_match_its_secrets(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    target = WebhookSecretsFileTarget("hooks", path)
    version = target.deploy([OLD])
    document = json.loads(path.read_text())
    document["secrets"] = [NEW]  # edited by hand, version left behind
    path.write_text(json.dumps(document))
    with pytest.raises(KeyturnError, match=f"names version {version}"):
        target.read_back()


def test_an_unwritable_directory_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    target = WebhookSecretsFileTarget("hooks", blocker / "secrets.json")
    with pytest.raises(KeyturnError) as caught:
        target.deploy([OLD])
    assert "is not a directory" in str(caught.value)


def test_a_write_that_fails_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    path.mkdir()  # os.replace cannot put a file over a directory, even as root
    with pytest.raises(KeyturnError) as caught:
        WebhookSecretsFileTarget("hooks", path).deploy([OLD])
    message = str(caught.value)
    assert message.startswith(f"deploy target hooks: cannot write {path} (")
    assert "\n" not in message
    assert [p.name for p in tmp_path.iterdir()] == ["secrets.json"]  # temp file cleaned up


def test_repr_names_the_target_not_the_secrets(tmp_path: Path) -> None:
    target = WebhookSecretsFileTarget("hooks", tmp_path / "secrets.json")
    target.deploy([OLD])
    assert repr(target) == f"WebhookSecretsFileTarget(name='hooks', path='{tmp_path}/secrets.json')"


# -------------------------------------------------------------------------------------- probe


def state_transport(versions: list[str | None], status: int = 200) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/_receiver/state"
        version = versions.pop(0) if len(versions) > 1 else versions[0]
        return httpx.Response(status, json={"secrets_version": version, "accepted": 0})

    return httpx.MockTransport(handler)


def test_probe_reads_the_loaded_version() -> None:
    probe = ReceiverStateProbe("rcv", "http://receiver/", transport=state_transport(["abc"]))
    assert probe.loaded_version_sync() == "abc"
    assert probe.name == "rcv"


def test_probe_waits_for_a_version() -> None:
    transport = state_transport(["old", "old", "new"])
    ReceiverStateProbe("rcv", "http://receiver", transport=transport).wait_for_version("new")


def test_probe_gives_up_with_one_line() -> None:
    probe = ReceiverStateProbe("rcv", "http://receiver", transport=state_transport(["old"]))
    with pytest.raises(KeyturnError) as caught:
        probe.wait_for_version("new", timeout=0.2)
    assert "still has secrets version old" in str(caught.value)


def test_probe_of_something_that_is_not_a_receiver() -> None:
    probe = ReceiverStateProbe("rcv", "http://receiver", transport=state_transport(["x"], 404))
    with pytest.raises(KeyturnError, match="answered 404"):
        probe.loaded_version_sync()


def test_probe_of_a_receiver_that_is_down() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    probe = ReceiverStateProbe("rcv", "http://receiver", transport=httpx.MockTransport(refuse))
    with pytest.raises(KeyturnError, match="did not answer"):
        probe.loaded_version_sync()


@pytest.mark.anyio
async def test_probe_implements_the_async_port() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"secrets_version": "v-async"})

    probe: SecretsProbe = ReceiverStateProbe(
        "rcv", "http://receiver", async_transport=httpx.MockTransport(handler)
    )
    assert await probe.loaded_version() == "v-async"


@pytest.mark.anyio
async def test_async_probe_of_a_receiver_that_is_down() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    probe = ReceiverStateProbe(
        "rcv", "http://receiver", async_transport=httpx.MockTransport(refuse)
    )
    with pytest.raises(KeyturnError, match="probe rcv: the receiver at http://receiver/_receiver"):
        await probe.loaded_version()


def test_the_target_satisfies_the_secrets_target_port(tmp_path: Path) -> None:
    target: SecretsTarget = WebhookSecretsFileTarget("hooks", tmp_path / "secrets.json")
    assert target.name == "hooks"
    version = target.deploy([OLD])
    assert target.read_back() == (version, (OLD,))
