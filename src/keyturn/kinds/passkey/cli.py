"""`keyturn passkeys`: campaigns of end users' passkey rotations, their progress, the cutover.

    keyturn passkeys campaign staff --users users.txt --reason "yearly" [--new-origin URL]
    keyturn passkeys progress [CAMPAIGN] [--json]
    keyturn passkeys cutover CAMPAIGN --reason "new domain live"

Every check (the entry, the file, the origins and rpIds, each user's current passkey at the
provider) is made before anything is written: a campaign that cannot start changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import typer

if TYPE_CHECKING:
    from keyturn.kinds.passkey.kind import PasskeyConfig
    from keyturn.plugin import Operations, PasskeyProvider

#: The evidence name of a cutover (keyturn.kinds.passkey.tasks.CUTOVER; not imported here, so
#: that `keyturn --help` does not load the plugin API).
CUTOVER = "cutover"


def _keyturn_error() -> type[Exception]:
    from keyturn.plugin import KeyturnError

    return KeyturnError


def _error(message: str) -> Exception:
    """A KeyturnError (one line for the person at the terminal), imported when needed."""
    return _keyturn_error()(message)


def operations() -> Operations:
    from keyturn.plugin import operations as ops

    return ops()


APP = typer.Typer(
    help="End users' passkeys: campaigns that ask each user to rotate, their progress, the "
    "cutover of a domain move.",
    no_args_is_help=True,
)


def progress(ops: Operations, campaign: str | None) -> dict[str, dict[str, int]]:
    """Counts by progress label for each passkey campaign (or the one named)."""
    return {
        name: counts
        for name, counts in ops.campaign_progress(campaign).items()
        if "invited" in counts  # a passkey campaign (the kind's own labels)
    }


def _entry(ops: Operations, entry: str) -> PasskeyConfig:
    from keyturn.kinds.passkey.kind import PasskeyConfig

    config = ops.credential_config(entry)
    if not isinstance(config, PasskeyConfig):
        raise _error(
            f"[credentials.{entry}] is a {config.kind} credential, not a passkey entry; name an "
            'entry with kind = "passkey"'
        )
    return config


def _users(file: Path | None, everyone: bool, ops: Operations, entry: str) -> list[str]:
    if (file is None) == (not everyone):
        raise _error("name the users: --users FILE (one username per line) or --all")
    if everyone:
        names = ops.members(entry)
        if not names:
            raise _error(f"--all: keyturn knows no user of {entry} yet; start with --users FILE")
        return names
    assert file is not None
    try:
        text = file.read_text()
    except OSError as exc:
        raise _error(f"--users {file}: cannot read it ({exc.strerror}); fix the path") from None
    names = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not names:
        raise _error(f"--users {file}: no usernames in it (one per line, # comments)")
    doubled = sorted(n for n, c in Counter(names).items() if c > 1)
    if doubled:
        raise _error(f"--users {file}: {doubled[0]} is listed twice; list each user once")
    return names


@dataclass(frozen=True)
class _Found:
    username: str
    credential_id: str | None = None
    credential_uuid: str | None = None
    why: str | None = None


async def _survey(
    ops: Operations, config: PasskeyConfig, users: Sequence[str], origins: Sequence[str]
) -> tuple[str, list[_Found]]:
    """The rpId of the user pages' origin, and each user's current passkey there (or why
    not). Reads only."""
    from keyturn.plugin import ProviderError, dfns_passkey_session

    session: PasskeyProvider = await ops.provider_session(
        dfns_passkey_session, config.signer, with_key=True
    )
    try:
        rps: dict[str, str | None] = {}
        for origin in origins:
            try:
                rps[origin] = await session.rp_for(users[0], origin)
            except ProviderError as exc:
                raise _error(
                    f"the provider refuses passkeys from {origin} ({exc}); allow that origin "
                    "for the organisation first"
                ) from None
        rp = rps[config.origin] or ""
        gate = asyncio.Semaphore(8)

        async def one(username: str) -> _Found:
            async with gate:
                try:
                    found = await session.user_credentials(username)
                except ProviderError as exc:
                    return _Found(username, why=f"cannot be read at the provider ({exc})")
            live = [c for c in found if c.kind == "Fido2" and c.is_active]
            here = [c for c in live if (c.relying_party_id or rp) == rp]
            if len(here) == 1:
                return _Found(username, here[0].credential_id, here[0].credential_uuid)
            if not here:
                return _Found(username, why=f"has no active passkey for {rp}")
            return _Found(username, why=f"has {len(here)} active passkeys for {rp}; rotate by hand")

        return rp, list(await asyncio.gather(*(one(u) for u in users)))
    finally:
        await session.aclose()


@APP.command("campaign")
def campaign_command(
    entry: Annotated[str, typer.Argument(help="The [credentials.NAME] entry of kind passkey.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded with each rotation).")],
    users: Annotated[
        Path | None, typer.Option("--users", help="A file of usernames, one per line.")
    ] = None,
    everyone: Annotated[
        bool, typer.Option("--all", help="Every user of the entry keyturn knows.")
    ] = False,
    new_origin: Annotated[
        str | None,
        typer.Option("--new-origin", help="Move the passkeys to this origin (a domain move)."),
    ] = None,
    new_rp_id: Annotated[
        str | None,
        typer.Option(
            "--new-rp-id", help="The new passkeys' rpId (default: the new origin's host)."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="The campaign's name.")] = None,
) -> None:
    """Start one passkey rotation per user: each gets a one-time link to register a new
    passkey, prove it and switch the old one off."""
    if not reason.strip():
        raise _error("--reason is empty; say why these passkeys are rotated")
    ops = operations()
    config = _entry(ops, entry)
    names = _users(users, everyone, ops, entry)
    new_origin, new_rp_id = _check_move(new_origin, new_rp_id)
    origins = [config.origin] + ([new_origin] if new_origin else [])
    from keyturn.kinds.passkey.kind import rp_id_fits

    rp, found = asyncio.run(_survey(ops, config, names, origins))
    if not rp_id_fits(rp, config.origin):
        raise _error(
            f"the provider does not allow passkeys from {config.origin} (the entry's origin; it "
            f"offers rpId {rp or 'none'}, which does not fit); allow that origin for the "
            "organisation first"
        )
    if new_origin is not None:
        # the provider's choice for the new origin must be the rpId the campaign asked for
        session_rp = asyncio.run(_rp_of(ops, config, names[0], new_origin)) or ""
        if not rp_id_fits(session_rp, new_origin):
            raise _error(
                f"the provider does not allow passkeys from {new_origin} (it offers rpId "
                f"{session_rp or 'none'}, which does not fit that origin); allow {new_origin} "
                f"and rpId {new_rp_id} for the organisation first"
            )
        if session_rp != new_rp_id:
            raise _error(
                f"the provider gives passkeys from {new_origin} the rpId {session_rp}, not "
                f"{new_rp_id}; allow {new_rp_id} for the organisation or pass --new-rp-id "
                f"{session_rp}"
            )
    ready = [f for f in found if f.why is None]
    if not ready:
        raise _error(f"no user can be invited: {found[0].username} {found[0].why}")
    campaign = name or f"cmp-{ops.now():%Y%m%d}-{secrets.token_hex(3)}"
    if name is not None and name in progress(ops, name):
        raise _error(f"a campaign named {name} exists already; choose another --name")
    started, skipped = 0, [f for f in found if f.why is not None]
    for f in ready:
        assert f.credential_id is not None and f.credential_uuid is not None
        member = ops.add_member(
            entry,
            f.username,
            credential_id=f.credential_id,
            credential_uuid=f.credential_uuid,
            algorithm="fido2",
        )
        options: dict[str, Any] = {"campaign": campaign}
        if new_origin is not None:
            options |= {"new_origin": new_origin, "new_rp_id": new_rp_id}
        try:
            ops.start(member.name, reason=reason, actor=ops.actor(), options=options)
        except _keyturn_error() as exc:
            skipped.append(_Found(f.username, why=str(exc)))
            continue
        started += 1
    move = f", moving from {rp} to {new_rp_id}" if new_origin else ""
    ops.print(f"campaign {campaign}: {started} users invited{move}, {len(skipped)} skipped")
    for f in skipped:
        ops.print(f"  skipped {f.username}: {f.why}")


def _check_move(new_origin: str | None, new_rp_id: str | None) -> tuple[str | None, str | None]:
    """The domain move's origin and rpId, checked (both None: no move)."""
    from keyturn.kinds.passkey.kind import origin_problem, rp_id_fits

    if new_origin is None:
        if new_rp_id is not None:
            raise _error("--new-rp-id goes with --new-origin (a domain move)")
        return None, None
    problem = origin_problem(new_origin)
    if problem:
        raise _error(f"--new-origin: {problem}")
    new_origin = new_origin.rstrip("/")
    rp = (new_rp_id or urlsplit(new_origin).hostname or "").lower()
    if not rp_id_fits(rp, new_origin):
        raise _error(
            f"--new-rp-id {rp} does not fit {new_origin}: an rpId must be the origin's host or "
            "a parent domain of it"
        )
    return new_origin, rp


async def _rp_of(ops: Operations, config: PasskeyConfig, username: str, origin: str) -> str | None:
    from keyturn.plugin import dfns_passkey_session

    session: PasskeyProvider = await ops.provider_session(
        dfns_passkey_session, config.signer, with_key=True
    )
    try:
        return await session.rp_for(username, origin)
    finally:
        await session.aclose()


@APP.command("progress")
def progress_command(
    campaign: Annotated[str | None, typer.Argument(help="A campaign (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table.")] = False,
) -> None:
    """How far each campaign's users are: invited, registered, proven, done, overdue."""
    ops = operations()
    counts = progress(ops, campaign)
    if campaign is not None and not counts:
        raise _error(f"no campaign named {campaign}; `keyturn passkeys progress` lists them")
    if as_json:
        ops.print(json.dumps(counts, indent=2))
        return
    if not counts:
        ops.print("no passkey campaign yet (keyturn passkeys campaign ENTRY --users FILE ...)")
        return
    labels = list(next(iter(counts.values())))
    width = max(len(n) for n in [*counts, "campaign"])
    ops.print(f"{'campaign':<{width}}  " + "  ".join(f"{k:>11}" for k in labels))
    for name, c in counts.items():
        ops.print(f"{name:<{width}}  " + "  ".join(f"{c[k]:>11}" for k in labels))


@APP.command("cutover")
def cutover_command(
    campaign: Annotated[str, typer.Argument(help="The domain-move campaign.")],
    reason: Annotated[str, typer.Option("--reason", help="Why now (recorded on each rotation).")],
) -> None:
    """End a domain move: each user's next visit (a new link, on the new origin) switches the
    old passkey off. Users who have not proven a new passkey yet are not affected until they
    have."""
    if not reason.strip():
        raise _error("--reason is empty; say why the cutover happens now")
    ops = operations()
    rotations = [r for r in ops.rotations_of("passkey") if r.data.get("campaign") == campaign]
    if not rotations:
        raise _error(f"no campaign named {campaign}; `keyturn passkeys progress` lists them")
    if not any(r.data.get("new_origin") for r in rotations):
        raise _error(f"campaign {campaign} is not a domain move (no --new-origin): no cutover")
    counts = progress(ops, campaign)[campaign]
    ops.print(f"campaign {campaign}: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n))
    open_ = [r for r in rotations if not r.finished]

    async def mark() -> int:
        done = 0
        for r in open_:
            done += await ops.add_evidence(r.id, CUTOVER, {"reason": reason}, actor=ops.actor())
        return done

    marked = asyncio.run(mark())
    ops.print(f"cutover recorded on {marked} unfinished rotations ({len(open_) - marked} had it)")
