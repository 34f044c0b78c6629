"""The passkey kill matrix: `keyturn serve --worker --user-port` (the worker and the user pages
in one process) SIGKILLed at every boundary of a user's passkey rotation, then started again:

- the worker's: each boundary of the invitation (before its intent, after it, after the call,
  after the outcome) and each transition's commit;
- the user pages': after the provider registered the new passkey, accepted the proof, and
  switched the old passkey off, each before its evidence was recorded.

After the restart the user opens the link again (the page session died with the process) and
is not asked again for what is already done: the rotation ends at old_deactivated with the
old passkey inactive, exactly one new passkey at the provider, each transition once, and one
invitation (by notification id) in the user's mailbox."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import ACTION_BOUNDARIES, Kt, transitions_once
from passkey_driver import PageRefused, SoftwareBrowser
from passkey_service import Journey, passkey_service, until

INVITE_POINTS = [f"forward.invite_enrol.{moment}" for moment in ACTION_BOUNDARIES]
#: Each transition's commit (the worker's), and each user write before its evidence (the
#: pages'), in the order a rotation meets them.
STEP_POINTS = [
    "pages.registered.after_call",
    "transition.add_new.after_commit",
    "pages.proven.after_call",
    "transition.verify.after_commit",
    "pages.deactivated.after_call",
    "transition.deactivate_old.after_commit",
]


@pytest.fixture
def service(make_kt: Callable[..., Kt], tmp_path: Path) -> Iterator[Journey]:
    # each point starts its own serve
    with passkey_service(make_kt, tmp_path, end_users=len(STEP_POINTS), start=False) as j:
        yield j


def _visit(browser: SoftwareBrowser, link: str) -> str | None:
    """The user does what the page asks; None when the server died under them or the link is
    refused (the rotation finished meanwhile)."""
    try:
        return browser.run(link)
    except (httpx.TransportError, PageRefused):
        return None


@pytest.mark.parametrize("points", [INVITE_POINTS, STEP_POINTS], ids=["invitation", "steps"])
def test_killed_at_every_boundary_the_user_is_not_asked_twice_and_one_passkey_is_made(
    service: Journey, tmp_path: Path, points: list[str]
) -> None:
    j, kt = service, service.kt
    device = kt.sandbox.authenticator()
    problems: list[str] = []
    for i, point in enumerate(points):
        started = time.monotonic()
        user = kt.sandbox.end_user(i)
        name = user["username"]
        marker = tmp_path / f"marker-{i}"
        # the campaign starts while serve does (it needs the store and the provider only)
        j.start(wait=False, KEYTURN_TEST_CRASH_AT=point, KEYTURN_TEST_CRASH_MARKER=str(marker))
        j.campaign(f"kill-{i}", [name])
        t2 = time.monotonic()
        browser = SoftwareBrowser(j.old, device)
        try:
            if point in STEP_POINTS:
                link = j.link_of(name)
                _visit(browser, link)  # the server dies during the visit, or after it
            assert j.killed() == -9, f"serve was not killed at {point}"
            t3 = time.monotonic()
            assert marker.read_text().split() == [point]
            j.start()
            t4 = time.monotonic()
            link = j.link_of(name)
            _visit(browser, link)
            t5 = time.monotonic()
            until(
                f"{point}: the rotation ends",
                lambda name=name: j.rotation(name)["state"] == "old_deactivated",
                60,
            )
            if browser.created != 1:  # registering twice is asking the user again
                problems.append(f"{point}: the user made {browser.created} passkeys")
        finally:
            browser.close()
            j.stop(kill=True)
        problems += _check(j, point, name, user, j.rotation(name))
        print(f"{point}: {time.monotonic() - started:.1f} s (campaign and start "
              f"{t2 - started:.1f}, killed {t3 - t2:.1f}, restart {t4 - t3:.1f}, "
              f"visit {t5 - t4:.1f})")  # fmt: skip
    assert not problems, "\n".join(problems)


def _check(
    j: Journey, point: str, name: str, user: dict[str, Any], rotation: dict[str, Any]
) -> list[str]:
    out = []
    creds = j.credentials(name)
    ours = [c for c in creds.values() if c["name"] == f"keyturn {rotation['id']}"]
    if len(ours) != 1 or not ours[0]["isActive"]:
        out.append(f"{point}: {len(ours)} new passkeys")
    if creds[user["credential_uuid"]]["isActive"]:
        out.append(f"{point}: the old passkey is still active")
    if not transitions_once(rotation):
        out.append(f"{point}: a transition was recorded twice")
    ids = {
        r.headers.get("Keyturn-Notification-Id")
        for r in j.mail.at("/mail")
        if r.json().get("kind") == "user_task" and r.json().get("to") == name
    }
    if len(ids) != 1:
        out.append(f"{point}: {len(ids)} invitations")
    return out
