"""`rotations rollback --preview` prints the planner's compensating actions; without --yes off a
terminal the rollback is refused with that preview and nothing changes; with --yes the worker
then makes exactly the provider requests the preview listed, in order."""

from __future__ import annotations

import json

from harness import SA, Kt, collapse, requests_since


def test_the_preview_is_what_the_rollback_then_does_at_the_provider(kt: Kt) -> None:
    rid = kt.rotate()
    assert kt.worker().returncode == 0
    short = rid[:12]

    text = kt.run("rotations", "rollback", short, "--preview").stdout
    assert f"rolling back rotation {rid} ({SA}, now old_deactivated) would, in order:" in text
    assert "reactivate_old" in text and "restore_old@local-files" in text
    preview = json.loads(kt.run("rotations", "rollback", short, "--preview", "--json").stdout)
    names = [a["name"] for a in preview["actions"]]
    assert names == [
        "reactivate_old",
        "restore_old@local-files",
        "deactivate_new",
        "prove_old",
    ]

    refused = kt.run("rotations", "rollback", short, "--reason", "undo", check=False)
    assert refused.returncode == 1
    assert "reactivate_old" in refused.stdout  # the preview, shown with the refusal
    assert refused.stderr.strip().splitlines() == [
        f"keyturn: error: rollback of {rid} not confirmed: review the plan above, then run it "
        "again with --yes"
    ]
    unchanged = kt.show(rid)
    assert unchanged["state"] == "old_deactivated" and unchanged["request"] is None

    expected = [
        (route, call["repeat"])
        for action in preview["actions"]
        for call in action["calls"]
        for route in call["provider_requests"]
    ]
    polled = {route for route, repeat in expected if repeat}
    seq, _ = requests_since(kt, 0)
    done = kt.run("rotations", "rollback", short, "--reason", "undo", "--yes").stdout
    assert rid in done
    assert kt.worker().returncode == 0
    assert kt.show(rid)["state"] == "rolled_back"
    _, log = requests_since(kt, seq)
    assert all(r["status"] < 300 for r in log), log
    assert collapse([r["route"] for r in log], polled) == collapse(
        [route for route, _ in expected], polled
    )
