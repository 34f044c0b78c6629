"""Passkey campaigns end to end with real worker processes and the sandbox over HTTP: the user's
part (what the user pages relay from the browser) is played by the software authenticator
through keyturn's Dfns client, and the evidence goes in through the pages' own backend. The
browser itself is tested in test_passkey_pages.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import KEYTURN, SA, Kt

from keyturn.adapters.dfns import DfnsClient, KeySigner, UserActionChallenge
from keyturn.cli.wiring import Wiring
from keyturn.config import load_config
from keyturn.kinds.passkey import tasks as t
from keyturn.kinds.passkey.backend import ServicesTasks
from keyturn.testing.authenticator import SoftwareAuthenticator

ORIGIN = "https://sandbox.keyturn.local"
ENTRY = "staff"


def passkey_entry(**extra: Any) -> str:
    lines = [
        f"[credentials.{ENTRY}]",
        'kind = "passkey"',
        'provider = "sandbox"',
        f'signer = "{SA}"',
        f'origin = "{ORIGIN}"',
        "check_every_seconds = 0.3",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n" + "\n".join(lines) + "\n"


@pytest.fixture
def staff(make_kt: Callable[..., Kt], tmp_path: Path) -> Iterator[tuple[Kt, list[str]]]:
    kt = make_kt(end_users=3)
    kt.config.write_text(kt.config.read_text() + passkey_entry())
    users = [kt.sandbox.end_user(i)["username"] for i in range(3)]
    yield kt, users


def worker(kt: Kt) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*KEYTURN, "worker"], env=kt.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def rotations(kt: Kt) -> dict[str, dict[str, Any]]:
    """The campaign's rotations by username."""
    listed = json.loads(kt.run("rotations", "list", "--json").stdout)
    return {r["credential"].split(":", 1)[1]: r for r in listed if r["kind"] == "passkey"}


def wait_until(what: Callable[[], Any], seconds: float = 30.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        got = what()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.2)


def tasks_of(kt: Kt) -> ServicesTasks:
    return ServicesTasks(Wiring(load_config(kt.config)))


def link_of(kt: Kt, rotation_id: str) -> str:
    """The link the user received (opened from its sealed copy, as a sink does)."""
    wiring = Wiring(load_config(kt.config))
    data = wiring.store.get_rotation(rotation_id).data
    url = wiring.vault.open(wiring.store.get_secret(data["link_ref"])).decode()
    return url.rsplit("/", 1)[1]


def relay(device: SoftwareAuthenticator, origin: str = ORIGIN) -> Any:
    async def sign(challenge: UserActionChallenge) -> dict[str, Any]:
        return device.first_factor(challenge.raw, origin=origin)

    return sign


async def user_rotates(kt: Kt, rotation_id: str, username: str, tmp: Path) -> str:
    """What the user pages do with the user's browser: register a passkey named for the
    rotation (signed by the old one), prove it, switch the old one off (signed by the new)."""
    tasks = tasks_of(kt)
    task = await tasks.open_link(link_of(kt, rotation_id))
    assert (task.task, task.username) == ("enrol", username)
    boot = kt.bootstrap["service_account"]
    signer = KeySigner.from_pem(boot["credential_id"], boot["private_key_pem"])
    old_device = kt.sandbox.authenticator()
    new_device = SoftwareAuthenticator(tmp / f"{username}-new.json")
    async with DfnsClient(kt.sandbox.base_url, boot["token"], signer=signer) as service:
        token = await service.delegated_login(username)
        user = service.as_user(token, relay=relay(old_device))
        challenge = await user.fido2_challenge(origin=ORIGIN)
        info = new_device.make_credential(
            rp_id=str(challenge.rp_id), origin=ORIGIN, challenge=challenge.challenge,
            user_id=str(challenge.user_id),
        )  # fmt: skip
        created = await user.create_fido2_credential(challenge, info, t.passkey_name(rotation_id))
        await tasks.record(rotation_id, t.REGISTERED, {"credential_uuid": created.credential_uuid})
        with_new = service.as_user(token, relay=relay(new_device))
        body = json.dumps({"credentialUuid": task.old_credential_uuid}, separators=(",", ":"))
        challenge2 = await with_new.user_action_challenge(
            "PUT", "/auth/credentials/deactivate", body
        )
        first = new_device.first_factor(challenge2.raw, origin=ORIGIN)
        await with_new.complete_user_action(challenge2, first)  # the provider accepted it
        await tasks.record(rotation_id, t.PROVEN, {"credential_id": created.credential_id})
        await with_new.deactivate_credential(task.old_credential_uuid)
        await tasks.record(rotation_id, t.OLD_DEACTIVATED, {})
    return created.credential_uuid


def test_campaign_bad_input_then_a_user_rotates_one_rolls_back_one_never_acts(
    staff: tuple[Kt, list[str]], tmp_path: Path
) -> None:
    kt, users = staff
    refuses_bad_input_and_changes_nothing(kt, users, tmp_path)
    listing = tmp_path / "users.txt"
    listing.write_text("\n".join(users) + "\n")
    started = kt.run(
        "passkeys", "campaign", ENTRY, "--users", str(listing), "--reason", "yearly",
        "--name", "spring",
    )  # fmt: skip
    assert "campaign spring: 3 users invited, 0 skipped" in started.stdout
    proc = worker(kt)
    try:
        waiting = wait_until(
            lambda: (
                all(r["wait_key"] == "forward.new_passkey:person" for r in rotations(kt).values())
                and rotations(kt)
            )
        )
        assert len(waiting) == 3
        ids = {u: r["id"] for u, r in rotations(kt).items()}
        # user 0 rotates; user 1's rotation is rolled back by an operator; user 2 never acts
        new_uuid = asyncio.run(user_rotates(kt, ids[users[0]], users[0], tmp_path))
        kt.run("rotations", "rollback", ids[users[1]], "--reason", "left", "--yes")
        done = wait_until(
            lambda: (
                (rs := rotations(kt))[users[0]]["state"] == "old_deactivated"
                and rs[users[1]]["state"] in ("rolled_back", "cancelled")
                and rs
            )
        )
        assert done[users[2]]["state"] == "pending"
        progress = json.loads(kt.run("passkeys", "progress", "spring", "--json").stdout)
        counts = progress["spring"]
        assert counts["done"] == 1 and counts["invited"] == 1
        assert counts["rolled_back"] + counts["cancelled"] == 1
    except AssertionError:
        proc.kill()
        out = proc.communicate()[0]
        raise AssertionError(
            f"{json.dumps(rotations(kt), indent=1)[:3000]}\n{out[-3000:]}"
        ) from None
    finally:
        proc.kill()
        proc.wait()

    # at the provider: user 0's old passkey is off and the one new passkey on; user 2 keeps
    # the old one
    def at_provider(username: str) -> dict[str, dict[str, Any]]:
        token = kt.sandbox.delegated_login(username)
        r = httpx.get(f"{kt.sandbox.base_url}/auth/credentials",
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)  # fmt: skip
        r.raise_for_status()
        return {c["credentialUuid"]: c for c in r.json()["items"]}

    first, never = at_provider(users[0]), at_provider(users[2])
    old_first = kt.sandbox.end_user(0)["credential_uuid"]
    assert first[old_first]["isActive"] is False
    assert [c["isActive"] for u, c in first.items() if u != old_first] == [True]
    assert first[new_uuid]["name"] == t.passkey_name(ids[users[0]])
    assert [c["isActive"] for c in never.values()] == [True]  # only the old one, still on
    managed = {c["name"]: c for c in kt.credentials()}
    assert managed[f"{ENTRY}:{users[0]}"]["credential_uuid"] == new_uuid
    # a link of a finished rotation is refused
    with pytest.raises(t.LinkRefused, match="finished"):
        asyncio.run(tasks_of(kt).open_link(link_of(kt, ids[users[0]])))


def refuses_bad_input_and_changes_nothing(kt: Kt, users: list[str], tmp_path: Path) -> None:
    listing = tmp_path / "one-user.txt"
    listing.write_text(users[0] + "\n")
    cases = [
        (["passkeys", "campaign", ENTRY, "--reason", "x"], "--users FILE"),
        (["passkeys", "campaign", SA, "--users", str(listing), "--reason", "x"], "not a passkey"),
        (["passkeys", "campaign", ENTRY, "--users", str(tmp_path / "nope"), "--reason", "x"],
         "cannot read"),
        (["passkeys", "campaign", ENTRY, "--users", str(listing), "--reason", "x",
          "--new-origin", "http://wallet.example"], "not a secure context"),
        (["passkeys", "campaign", ENTRY, "--users", str(listing), "--reason", "x",
          "--new-origin", "https://wallet.example", "--new-rp-id", "other.example"],
         "does not fit"),
        (["passkeys", "campaign", ENTRY, "--users", str(listing), "--reason", "x",
          "--new-origin", "https://wallet.newdomain.example"], "does not allow passkeys from"),
        (["passkeys", "cutover", "nope", "--reason", "x"], "no campaign named nope"),
    ]  # fmt: skip
    for args, words in cases:
        got = kt.run(*args, check=False)
        assert got.returncode != 0, args
        lines = got.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, got.stderr)
    assert [r for r in json.loads(kt.run("rotations", "list", "--json").stdout)
            if r["kind"] == "passkey"] == []  # fmt: skip
    assert not [c for c in kt.credentials() if c["name"].startswith(f"{ENTRY}:")]
