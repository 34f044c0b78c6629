"""Issue 12's "Why" list, rerun: each example found by trying keyturn as a new user would, as a
test of what it does now. Examples with a test of their own elsewhere are indexed here:

- no config: where keyturn looked, nothing created: test_config_honesty.py
  ``test_no_config_says_where_it_looked_and_creates_nothing``
- kill -9 of a worker (lease renewal, `keyturn workers`, takeover in the timeline, truthful
  resume): test_liveness.py ``test_kill_9_of_the_holder``
- every hint of a halted rotation in every state runs: tests/unit/test_hint_walk.py
- rollback of a finished rotation previews and asks: test_rollback_preview.py
- `grace_seconds` on a service account refused: test_config_honesty.py
  ``test_a_key_of_another_kind_is_refused_with_file_key_and_fix``
- tracebacks and a value blamed on the wrong source: test_bad_input_sweep.py,
  test_config_honesty.py ``test_bad_database_url_in_the_environment_is_not_blamed_on_the_file``
- start-up: tests/unit/test_start_up_imports.py and tests/bench/test_startup.py
- `credentials import` checks at the provider, 50 in one file, `rotate --all`:
  test_fleet_verbs.py
- a key added by hand is a reconcile finding: test_reconcile.py
- every option has help text: tests/unit/test_cli_help.py

The rest are here, on one installation: the service account's rotation halted (its token file
gone), the PAT's finished.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from harness import KEYTURN, PAT, SA, WEBHOOK, Kt, KtFactory

from keyturn.sandbox.testing import start_sandbox


@dataclass
class Scene:
    kt: Kt
    halted: str
    done: str
    worker: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    factory = KtFactory(tmp_path_factory.mktemp("examples"))
    try:
        kt = factory.make()
        done = kt.rotate(PAT)
        assert kt.worker("--until-idle").returncode == 0
        token_file = kt.workdir / "sa.token"
        token_file.write_text(kt.bootstrap["service_account"]["token"])
        kt.patch_config('algorithm = "ed25519"', 'algorithm = "ed25519"\ntoken_file = "sa.token"')
        token_file.unlink()  # the next rotation of SA cannot authenticate: a halt
        halted = kt.rotate(SA)
        worker = kt.worker("--until-idle")
        assert kt.show(halted)["halted_reason"]
        yield Scene(kt, halted, done, worker)
    finally:
        factory.close()


def _piped(kt: Kt, shell: str, **env: str) -> str:
    """A shell pipeline whose first command is keyturn (`KT`), output not a terminal."""
    kt_cmd = " ".join(KEYTURN)
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", shell.replace("KT", kt_cmd)],
        env=kt.env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_halted_ids_from_a_pipe_are_whole_and_accepted(scene: Scene) -> None:
    """`rotations list | grep HALTED | awk '{print $1}'` printed cut ids that `show`
    refused, and there was no filter for halted rotations, a credential, or a row limit."""
    kt = scene.kt
    ids = _piped(kt, "KT rotations list | grep -i halted | awk '{print $1}'").split()
    assert ids == [scene.halted]
    every = _piped(kt, "KT rotations list | awk 'NR > 1 {print $1}'").split()
    assert sorted(every) == sorted([scene.halted, scene.done])
    for rid in every:
        assert kt.show(rid)["id"] == rid
    assert _piped(kt, "KT rotations list --status halted | awk 'NR > 1 {print $1}'").split() == [
        scene.halted
    ]
    assert _piped(kt, "KT rotations list --state halted 2>&1 || true").startswith(
        "keyturn: error: --state 'halted' is not known"
    )  # halted is a status, and the error says which states there are
    only_pat = _piped(kt, f"KT rotations list --credential {PAT} | awk 'NR > 1 {{print $1}}'")
    assert only_pat.split() == [scene.done]
    assert len(_piped(kt, "KT rotations list --limit 1").splitlines()) == 2  # header + 1


def test_worker_exits_3_and_reconcile_reports_the_halt(scene: Scene) -> None:
    """`worker --until-idle` exited 0 after halting a rotation, and `reconcile` said "provider
    and store agree" while it was halted."""
    assert scene.worker.returncode == 3
    assert scene.halted in scene.worker.stderr
    reconcile = scene.kt.run("reconcile", check=False)
    assert reconcile.returncode == 1
    assert scene.halted in reconcile.stdout + reconcile.stderr
    assert "agree" not in reconcile.stdout


def test_a_halted_rotation_shows_no_next_attempt_and_its_hints_name_commands(
    scene: Scene,
) -> None:
    """A halted rotation showed a "next attempt" in the past; "reconcile before retrying"
    named no command; an unknown id pointed to `keyturn status`, which does not exist."""
    kt = scene.kt
    text = kt.run("rotations", "show", scene.halted).stdout
    assert "next attempt" not in text.lower()
    for line in text.splitlines():
        if "reconcile" in line.lower():
            assert "keyturn reconcile" in line, line
    unknown = kt.run("rotations", "show", "rot_0000", check=False)
    assert "keyturn status" not in unknown.stderr
    assert "`keyturn rotations list`" in unknown.stderr


def test_show_at_120_columns_folds_without_breaking_commands_or_ids(scene: Scene) -> None:
    """In a 120-column terminal the timeline wrapped each retry into 6-12 lines, broke the
    printed resume command mid-id, and mixed three time formats, none marked UTC."""
    kt = scene.kt
    text = _piped(kt, f"KT rotations show {scene.halted}", COLUMNS="120")
    lines = text.splitlines()
    assert all(len(line) <= 120 for line in lines), max(lines, key=len)
    commands = re.findall(r"`(keyturn [^`]+)`", text)
    assert commands, text
    assert any(scene.halted in c for c in commands)  # the id whole, inside its command
    stamps = re.findall(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[^\s]*(?: [A-Z]+)?", text)
    assert stamps
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", s) for s in stamps), stamps
    assert not re.search(r"\d\d:\d\d:\d\d\.\d", text)  # no fractions of a second


def test_json_carries_the_status_and_credentials_list_has_a_header(scene: Scene) -> None:
    """`--json` lacked the status the table shows; `credentials list` had no header; there
    was no `--version`."""
    kt = scene.kt
    rows = json.loads(kt.run("rotations", "list", "--json").stdout)
    by_id = {r["id"]: r for r in rows}
    assert by_id[scene.halted]["status"] == "halted"
    assert by_id[scene.done]["status"] == "done"
    listed = kt.run("credentials", "list").stdout.splitlines()
    assert listed[0].split()[:2] == ["name", "kind"]
    assert {SA, PAT, WEBHOOK} <= {line.split()[0] for line in listed[1:]}
    assert re.fullmatch(r"keyturn \S+\n", kt.run("--version").stdout)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_init_leaves_the_webhook_disabled_until_a_receiver_holds_its_secret(
    tmp_path: Path,
) -> None:
    """`init --receiver-url` created the webhook enabled before any receiver could hold its
    secret, so every event delivered before the receiver started was rejected."""
    sandbox = start_sandbox(tmp_path / "sandbox")
    try:
        work = tmp_path / "work"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")}
        url = f"http://127.0.0.1:{_closed_port()}"
        proc = subprocess.run(
            [*KEYTURN, "init", str(work), "--sandbox-bootstrap", str(sandbox.bootstrap_path),
             "--receiver-url", url],
            env=env, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        assert f"keyturn init {work} --enable-webhook" in proc.stdout
        hooks = _webhooks(sandbox.base_url, sandbox.bootstrap_path)
        assert [h["status"] for h in hooks if str(h["url"]).startswith(url)] == ["Disabled"], hooks
        # still nothing answers: enabling is refused with the same advice, and nothing changes
        again = subprocess.run(
            [*KEYTURN, "init", str(work), "--enable-webhook"],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert again.returncode == 1 and "--enable-webhook" in again.stderr
        hooks = _webhooks(sandbox.base_url, sandbox.bootstrap_path)
        assert [h["status"] for h in hooks if str(h["url"]).startswith(url)] == ["Disabled"]
    finally:
        sandbox.stop()


def _webhooks(base_url: str, bootstrap: Path) -> list[dict[str, object]]:
    token = json.loads(bootstrap.read_text())["service_account"]["token"]
    r = httpx.get(base_url + "/webhooks", headers={"Authorization": f"Bearer {token}"})
    r.raise_for_status()
    return list(r.json()["items"])
