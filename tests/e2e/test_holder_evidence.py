"""Holder evidence end to end: the holder demo service reads the service account's key from its
`file` target and signs with it; an `http` probe asks it which key it uses. The old credential
is switched off only after the holder has switched; with the holder down the rotation waits
(no lease, no attempt) and halts at its deadline with the old credential active."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from harness import KEYTURN, SA, Kt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from demo_fixture import Demo
from demo_fixture import start_demo as start_demo  # a fixture (re-exported)

from keyturn.holders import fingerprint_of_private


def with_holder(kt: Kt, url: str, deadline: float) -> None:
    kt.patch_config(
        f"[credentials.{SA}]\n",
        f"[credentials.{SA}]\nholder_check_seconds = 0.2\nholder_deadline_seconds = {deadline}\n",
    )
    with kt.config.open("a") as out:
        out.write(f'\n[[credentials.{SA}.probes]]\ntype = "http"\nname = "demo"\nurl = "{url}"\n')


def demo_for(kt: Kt, start: Callable[..., Demo], tmp_path: Path) -> Demo:
    token_file = tmp_path / "token"
    token_file.write_text(kt.bootstrap["service_account"]["token"] + "\n")
    token_file.chmod(0o600)
    demo = start(
        "--key-dir", str(kt.workdir / "deploy" / SA), "--port", "0",
        "--base-url", kt.sandbox.base_url, "--token-file", str(token_file),
        "--sign-every", "0.2",
    )  # fmt: skip
    demo.wait_for_url()
    return demo


def test_the_old_key_is_switched_off_only_after_the_holder_switched(
    make_kt: Callable[..., Kt], start_demo: Callable[..., Demo], tmp_path: Path
) -> None:
    kt = make_kt()
    demo = demo_for(kt, start_demo, tmp_path)
    old_fp = fingerprint_of_private(kt.deployed(SA)[0])
    demo.wait_for("a signature with the old key", lambda s: s["last_signed_fingerprint"] == old_fp)
    with_holder(kt, demo.url, deadline=60)
    rid = kt.rotate()
    done = kt.worker()
    assert done.returncode == 0, done.stderr[-2000:]
    rotation = kt.show(rid)
    assert rotation["state"] == "old_deactivated", rotation
    new_fp = fingerprint_of_private(kt.deployed(SA)[0])
    assert new_fp != old_fp
    status = demo.wait_for("the new key in use", lambda s: s["fingerprint"] == new_fp)
    loaded = datetime.fromisoformat(status["loaded_at"].replace("Z", "+00:00"))
    deactivate = next(a for a in rotation["actions"] if a["name"] == "deactivate_old")
    assert loaded < datetime.fromisoformat(deactivate["intent_at"])
    # the holder keeps signing, now with the new key, after the old one was switched off
    after = datetime.fromisoformat(deactivate["outcome_at"])
    demo.wait_for(
        "a signature with the new key after the switch-off",
        lambda s: (
            s["last_signed_fingerprint"] == new_fp
            and datetime.fromisoformat(s["last_signed_ok_at"].replace("Z", "+00:00")) > after
        ),
    )


def test_with_the_holder_down_the_rotation_waits_then_halts_with_the_old_key_active(
    make_kt: Callable[..., Kt], start_demo: Callable[..., Demo], tmp_path: Path
) -> None:
    kt = make_kt()
    demo = demo_for(kt, start_demo, tmp_path)
    url = demo.url
    demo.proc.terminate()
    demo.proc.wait(10)
    with_holder(kt, url, deadline=4)
    old_uuid = kt.deployed(SA)[1]["credentialUuid"]
    rid = kt.rotate()
    worker = subprocess.Popen(
        [*KEYTURN, "worker", "--until-idle"],
        env=kt.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        waiting = kt.show_here(rid)
        # between two checks the rotation holds no lease (a check claims it for milliseconds)
        while not (waiting["wait_key"] and waiting["lease"] is None):
            assert time.monotonic() < deadline, waiting
            time.sleep(0.05)
            waiting = kt.show_here(rid)
        assert waiting["state"] == "new_added" and waiting["halted_reason"] is None
        assert waiting["wait_key"] == "forward.holders_new", waiting
        assert "demo" in waiting["wait_for"], waiting["wait_for"]
        assert waiting["attempts"] == 0
        assert kt.provider_credentials()[old_uuid]["isActive"]
        worker.wait(timeout=30)  # it halts at the deadline, then nothing is due
    finally:
        worker.kill()
        worker.wait()
    halted = kt.show(rid)
    assert halted["halted_reason"], halted
    assert "holders to use the new key" in halted["halted_reason"]
    assert "deadline" in halted["halted_reason"]
    assert halted["state"] == "new_added" and halted["attempts"] == 0
    assert kt.provider_credentials()[old_uuid]["isActive"]
