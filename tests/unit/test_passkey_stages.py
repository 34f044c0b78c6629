"""Which step the passkey user pages offer, from a link's task and its evidence: what is done
is never asked again, and the domain move's steps happen on the origin they belong to."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from keyturn.kinds.passkey.pages import Refused, Session, check_assertion, stage_of
from keyturn.kinds.passkey.tasks import (
    OLD_DEACTIVATED,
    PROVEN,
    REGISTERED,
    ROLLED_BACK,
    LinkTask,
)

OLD = "http://old.localhost"
NEW = "http://new.localhost"


def task(kind: str = "enrol", *evidence: str, move: bool = False, may: bool = True) -> LinkTask:
    return LinkTask(
        rotation_id="r1",
        username="u",
        user_id="us-1",
        old_credential_uuid="cr-old",
        old_credential_id="old",
        task=kind,  # type: ignore[arg-type]
        origin=OLD,
        new_origin=NEW if move else None,
        may_deactivate=may,
        new_credential_uuid=None,
        new_credential_id=None,
        evidence=frozenset(evidence),
        expires_at=datetime.now(UTC),
        link_hash="h",
    )


def session(signed_in: bool = False) -> Session:
    return Session("sid", "r1", "h", "enrol", OLD, "csrf", 0.0, signed_in=signed_in)


@pytest.mark.parametrize(
    ("link", "signed_in", "origin", "stage"),
    [
        (task(), False, OLD, "signin"),
        (task(), True, OLD, "signin"),  # signing in and registering are one step
        (task("enrol", REGISTERED), False, OLD, "prove"),
        (task("enrol", REGISTERED, PROVEN), False, OLD, "prove"),  # the deactivation is left
        (task("enrol", REGISTERED, PROVEN, OLD_DEACTIVATED), False, OLD, "done"),
        (task(move=True, may=False), False, OLD, "move"),
        (task("enrol", REGISTERED, move=True, may=False), False, OLD, "continue"),
        (task("enrol", REGISTERED, move=True, may=False), False, NEW, "prove"),
        (task(move=True, may=False), False, NEW, "reopen"),
        (task("enrol", REGISTERED, PROVEN, move=True, may=False), False, NEW, "done-for-now"),
        (task("enrol", REGISTERED, PROVEN, move=True, may=False), False, OLD, "done-for-now"),
        (task("deactivate", REGISTERED, PROVEN), False, NEW, "deactivate"),
        (task("deactivate", OLD_DEACTIVATED), False, NEW, "done"),
        (task("rollback", REGISTERED), False, OLD, "rollback"),
        (task("rollback", ROLLED_BACK), False, OLD, "done"),
    ],
)
def test_stage_follows_the_evidence(
    link: LinkTask, signed_in: bool, origin: str, stage: str
) -> None:
    assert stage_of(link, session(signed_in), origin) == stage


def test_an_assertion_must_come_from_the_expected_passkey_and_name_the_user() -> None:
    handle = "dXMtMQ"  # base64url of "us-1"
    check_assertion("old", handle, "old", "us-1")
    check_assertion("old", None, "old", "us-1")  # a non-discoverable passkey has no handle
    for cred_id, user_handle, expect, user_id in (
        ("other", handle, "old", "us-1"),  # someone else's passkey
        ("old", "dXMtMg", "old", "us-1"),  # the handle names another user
        ("old", handle, None, "us-1"),  # nothing was asked for
        ("old", handle, "old", None),  # the user's id is unknown
        ("old", "!!", "old", "us-1"),
    ):
        with pytest.raises(Refused):
            check_assertion(cred_id, user_handle, expect, user_id)
