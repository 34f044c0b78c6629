"""`keyturn serve`'s application: the REST API under /v1, /healthz and /readyz.

Reads render rotations with the CLI's own functions; writes go through the engine's operator
service (keyturn.engine.operator) exactly as the CLI's verbs do, with the token's name as the
actor. Every verb needs a reason, an ``If-Match`` carrying the rotation's revision, and takes an
``Idempotency-Key``; every outcome (applied, requested, refused) lands in the timeline.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations, some of
# which are local to create_app.
import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from keyturn.cli import liveness, render
from keyturn.cli.workers import workers_report
from keyturn.domain.errors import KeyturnError, NotFound
from keyturn.domain.lifecycle import State
from keyturn.domain.model import (
    ApiToken,
    IdempotencyRecord,
    ManagedCredential,
    OperatorAction,
    Role,
    Rotation,
)
from keyturn.engine import operator
from keyturn.engine.access import authenticate, fingerprint
from keyturn.engine.attention import attention, revision, status_key
from keyturn.engine.registry import Registry
from keyturn.engine.run import EngineDeps, db
from keyturn.ports import AccessStore, Clock, Store
from keyturn.web import metrics as web_metrics
from keyturn.web import schemas as s

#: The verbs of POST /v1/rotations/{id}/{verb}: an OperatorAction, or None for retry-now.
VERBS: dict[str, OperatorAction | None] = {
    "resume": OperatorAction.RESUME,
    "pause": OperatorAction.PAUSE,
    "cancel": OperatorAction.CANCEL,
    "rollback": OperatorAction.ROLLBACK,
    operator.RETRY_NOW: None,
    "approve": OperatorAction.APPROVE,
    "deny": OperatorAction.DENY,
    "release-lease": OperatorAction.RELEASE_LEASE,
}
#: The least role of each verb (the rest need an operator).
VERB_ROLES = {"release-lease": Role.ADMIN}
VERB_HELP = {
    "resume": "Resume a halted or paused rotation with a fresh retry budget.",
    "pause": "Stop working on the rotation at its next action boundary until resumed.",
    "cancel": "Cancel a rotation that has not touched the provider yet.",
    "rollback": "Undo the rotation (see its rollback-plan first).",
    operator.RETRY_NOW: "Skip the backoff of a retrying rotation: its next attempt is now. "
    "Refused (409, with the reason) when it is not backing off.",
    "approve": "Give the approval a rotation awaits (its policy's approval): it carries on.",
    "deny": "Refuse the approval a rotation awaits: it rolls back (or is cancelled if it has "
    "done nothing yet).",
    "release-lease": "Admin only. Ask the worker holding the rotation's lease to give it back "
    "at its next action boundary (202). A lease is never cut short: when the holder is "
    "silent, the rotation becomes claimable when the lease it holds expires, and the next "
    "worker to claim it records the release. Refused (409) when no lease is held.",
}
MAX_PAGE = 200
UNTIL_HELP = "Up to this date (ISO 8601, or a duration such as 30d; default 30 days on)."


@dataclass
class Backend:
    """What the composition root (keyturn.cli.serve) hands the app: ports and callables."""

    store: Store
    access: AccessStore
    registry: Registry
    clock: Clock
    lease_seconds: float
    max_attempts: int
    #: The engine's dependencies, for verbs carried out at once (no lease holder).
    engine_deps: Callable[[], EngineDeps]
    #: The rollback plan of a rotation as `rotations rollback --preview --json` prints it.
    rollback_plan: Callable[[str], dict[str, Any]]
    #: None when the database is reachable and at the head revision, else why not.
    readiness: Callable[[], str | None]
    head_revision: str
    #: `keyturn plan --json` (until, credential): KeyturnError for a bad `until`.
    plan: Callable[[str | None, str | None], dict[str, Any]]
    #: What `credentials list --json` adds per credential (key age, last and next rotation,
    #: policy), in the order given.
    inventory: Callable[[Sequence[ManagedCredential]], list[dict[str, Any]]]
    #: The configured deploy targets and probes of a credential, by type and name only
    #: ({"targets": [...], "probes": [...]}; both empty when it is not in the config).
    configured: Callable[[str], dict[str, list[dict[str, str]]]]
    #: Who may read /metrics: "token" (a viewer token), "open" or "off" (``[serve] metrics``).
    metrics: str = "token"
    #: The /metrics body (keyturn.web.metrics.scraper); None: no /metrics route.
    scrape: Callable[[], bytes] | None = None
    #: The schedule's time (what a campaign's "overdue" is measured on); None: the clock's.
    schedule_now: Callable[[], datetime] | None = None


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status, detail=" ".join(detail.split()), headers=headers)


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    words = {
        400: "Bad query (a cursor this API did not give)",
        401: "No token, or a token that is unknown or revoked",
        403: "The token's role is too low",
        404: "No such rotation (or credential)",
        409: "Refused: the verb does not apply to the rotation now (the reason says why)",
        412: "If-Match names a revision the rotation no longer has",
        422: "Invalid input, or an Idempotency-Key reused with another request",
        428: "If-Match is missing",
        503: "Not ready (the reason says why)",
    }
    return {c: {"model": s.Problem, "description": words[c]} for c in codes}


READ = _responses(401, 403, 422)
ONE = _responses(401, 403, 404, 422)
VERB = _responses(401, 403, 404, 409, 412, 422, 428)

bearer = HTTPBearer(auto_error=False, description="An API token (`keyturn tokens create`).")


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt is not None else None


def _core(r: Rotation, now: datetime) -> dict[str, Any]:
    doc = render.rotation_dict(r)
    ids = render.identities(r)
    for key in ids:
        doc.pop(key, None)
    doc.update(
        identities=ids,
        status=status_key(r),
        status_text=render.status_of(r),
        attention=attention(r, now),
        revision=revision(r),
    )
    return doc


def _detail(b: Backend, r: Rotation) -> dict[str, Any]:
    """What `rotations show --json` says (render.show_document), in the API's shape."""
    shown = render.show_document(b.store, r, b.lease_seconds)
    now = b.clock.now()
    doc = _core(r, now)
    lease = shown["lease"]
    if lease is not None:
        beat = lease["holder"]["last_heartbeat_at"]
        age = (now - datetime.fromisoformat(beat)).total_seconds() if beat else None
        lease["heartbeat_age_seconds"] = round(max(0.0, age), 3) if age is not None else None
    stopped = r.halted_reason or r.paused or r.finished or r.wait_for is not None
    doc.update(
        lease=lease,
        attempt={
            "n": r.attempts,
            "max": b.max_attempts,
            "next_attempt_at": None if stopped else _iso(r.next_attempt_at),
        },
        wait={
            "reason": r.wait_for,
            "key": r.wait_key,
            "since": _iso(r.wait_since),
            "deadline": _iso(r.wait_deadline),
            "next_check_at": _iso(r.next_attempt_at),
        }
        if r.wait_for is not None
        else None,
        actions=shown["actions"],
        timeline=shown["events"],
    )
    return doc


# --------------------------------------------------------------------------------- cursors


def _cursor_of(r: Rotation) -> str:
    raw = json.dumps([r.created_at.isoformat(), r.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor_key(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, rid = json.loads(raw)
        when = datetime.fromisoformat(at)
        if when.tzinfo is None or not isinstance(rid, str):
            raise ValueError(cursor)
        return when, rid
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise _problem(
            400,
            "cursor is not one this API gave (pass next_cursor from the previous page, or "
            "start again without it)",
        ) from None


# ------------------------------------------------------------------------------------- app


def create_app(backend: Backend) -> FastAPI:  # noqa: C901 (one nested function per route)
    app = FastAPI(
        title="keyturn",
        version="1",
        summary="Credential rotations: see them, and resume, pause, cancel, roll back or retry.",
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    b = backend

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:3]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(problems) or "invalid input"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    def caller(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> ApiToken:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise _problem(401, "an API token is required: Authorization: Bearer TOKEN", challenge)
        token = authenticate(b.access, credentials.credentials)
        if token is None:
            raise _problem(401, "the API token is unknown or revoked", challenge)
        return token

    def role(needed: Role) -> Callable[[ApiToken], ApiToken]:
        def check(token: Annotated[ApiToken, Depends(caller)]) -> ApiToken:
            if not token.role.allows(needed):
                raise _problem(
                    403,
                    f"token {token.name} has role {token.role.value}; this needs "
                    f"{needed.value} or above",
                )
            return token

        return check

    Viewer = Annotated[ApiToken, Depends(role(Role.VIEWER))]
    Operator = Annotated[ApiToken, Depends(role(Role.OPERATOR))]
    Admin = Annotated[ApiToken, Depends(role(Role.ADMIN))]
    RotationId = Annotated[str, Path(description="A rotation id (rotations list gives them).")]

    def rotation_or_404(rotation_id: str) -> Rotation:
        try:
            return b.store.get_rotation(rotation_id)
        except NotFound:
            raise _problem(404, f"no rotation with id {rotation_id!r}") from None

    # ------------------------------------------------------------------------ probes

    @app.get("/healthz", response_model=s.Health, tags=["probes"])
    def healthz() -> dict[str, Any]:
        """The process is up (no database access)."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=s.Ready, tags=["probes"], responses=_responses(503))
    def readyz() -> Any:
        """The database is reachable and its schema is at the revision this keyturn needs."""
        reason = b.readiness()
        if reason is not None:
            return JSONResponse({"detail": reason}, status_code=503)
        return {"status": "ready", "revision": b.head_revision}

    # ------------------------------------------------------------------------- reads

    @app.get("/v1/rotations", response_model=s.RotationPage, tags=["rotations"], responses={
        **READ, **_responses(400)})  # fmt: skip
    def list_rotations(
        _: Viewer,
        state: Annotated[State | None, Query(description="Only this state.")] = None,
        status: Annotated[s.StatusName | None, Query(description="Only this status.")] = None,
        credential: Annotated[str | None, Query(description="Only its rotations.")] = None,
        kind: Annotated[str | None, Query(description="Only this kind.")] = None,
        attention_only: Annotated[
            bool,
            Query(
                alias="attention",
                description="Only rotations that need a human (halted, holder lost, a request "
                "not applied, waiting past half its deadline, retrying).",
            ),
        ] = False,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        cursor: Annotated[str | None, Query(description="next_cursor of the last page.")] = None,
    ) -> dict[str, Any]:
        """Rotations, newest first, a page at a time (filtered and paged in the store's
        query; the cursor is the last row's position, so rows that come or go between pages
        never shift one)."""
        now = b.clock.now()
        before = _cursor_key(cursor) if cursor is not None else None
        page, more = operator.list_rotations(
            b.store,
            now,
            state=state,
            status=status,
            credential=credential,
            kind=kind,
            attention_only=attention_only,
            before=before,
            limit=limit,
        )
        items = [{**_core(r, now), "lease": render.rotation_dict(r)["lease"]} for r in page]
        return {"items": items, "next_cursor": _cursor_of(page[-1]) if more and page else None}

    @app.get(
        "/v1/rotations/{rotation_id}",
        response_model=s.RotationDetail,
        response_model_by_alias=True,
        tags=["rotations"],
        responses=ONE,
    )
    def get_rotation(_: Viewer, rotation_id: RotationId, response: Response) -> dict[str, Any]:
        """Timeline, action records, lease and holder liveness, attempts, wait, errors, and
        the revision (also the ETag) that a verb's If-Match names."""
        r = rotation_or_404(rotation_id)
        response.headers["ETag"] = f'"{revision(r)}"'
        return _detail(b, r)

    @app.get(
        "/v1/rotations/{rotation_id}/rollback-plan",
        response_model=s.RollbackPlan,
        tags=["rotations"],
        responses=_responses(401, 403, 404, 409, 422),
    )
    def rollback_plan(_: Viewer, rotation_id: RotationId) -> dict[str, Any]:
        """What a rollback would do from where the rotation stands, in order (from the
        planner, as `keyturn rotations rollback --preview --json`); 409 when rollback is
        refused now, with the reason."""
        rotation_or_404(rotation_id)
        try:
            return b.rollback_plan(rotation_id)
        except KeyturnError as exc:
            raise _problem(409, str(exc)) from None

    def credential_docs(creds: Sequence[ManagedCredential]) -> list[dict[str, Any]]:
        now = b.clock.now()
        views = b.inventory(creds)
        out = []
        for c, view in zip(creds, views, strict=True):
            rotations, _ = operator.list_rotations(b.store, now, credential=c.name, limit=1)
            latest = rotations[0] if rotations else None
            done, _ = operator.list_rotations(
                b.store, now, credential=c.name, state=State.OLD_DEACTIVATED, limit=1
            )
            out.append(
                {
                    **render.credential_dict(c),
                    **view,
                    "latest_rotation": {
                        "id": latest.id,
                        "state": latest.state.value,
                        "status": status_key(latest),
                        "created_at": latest.created_at,
                        "finished_at": latest.finished_at,
                    }
                    if latest
                    else None,
                    "last_completed_at": done[0].finished_at if done else None,
                    **b.configured(c.name),
                }
            )
        return out

    @app.get("/v1/credentials", response_model=list[s.CredentialOut], tags=["credentials"],
             responses=READ)  # fmt: skip
    def list_credentials(_: Viewer) -> list[dict[str, Any]]:
        """Managed credentials (as `credentials list --json`): their key's age, their last
        and next rotation, their policy, their deploy targets and probes."""
        return credential_docs(b.store.list_credentials())

    @app.get("/v1/credentials/{name}", response_model=s.CredentialOut, tags=["credentials"],
             responses=ONE)  # fmt: skip
    def get_credential(
        _: Viewer, name: Annotated[str, Path(description="A managed credential's name.")]
    ) -> dict[str, Any]:
        """One managed credential, as in the list."""
        try:
            found = b.store.get_credential(name)
        except NotFound:
            raise _problem(404, f"no managed credential named {name!r}") from None
        return credential_docs([found])[0]

    @app.get("/v1/plan", response_model=s.Plan, tags=["plan"], responses={
        **ONE, **_responses(400)})  # fmt: skip
    def get_plan(
        _: Viewer,
        until: Annotated[str | None, Query(description=UNTIL_HELP)] = None,
        credential: Annotated[str | None, Query(description="Only this credential.")] = None,
    ) -> dict[str, Any]:
        """Every rotation the policies would start before `until` (as `keyturn plan --json`):
        when, why, the gates, and the exact external calls of each, in order. Reads only."""
        if credential is not None:
            try:
                b.store.get_credential(credential)
            except NotFound:
                raise _problem(404, f"no managed credential named {credential!r}") from None
        try:
            return b.plan(until, credential)
        except KeyturnError as exc:
            raise _problem(400, str(exc)) from None

    @app.get("/v1/workers", response_model=list[s.WorkerOut], tags=["workers"], responses=READ)
    def list_workers(_: Viewer) -> list[dict[str, Any]]:
        """Worker processes (as `keyturn workers --json`): heartbeat age, status, leases."""
        return workers_report(b.store, b.clock.now())

    @app.get("/v1/tokens", response_model=list[s.TokenOut], tags=["tokens"], responses=READ)
    def list_tokens(_: Admin) -> list[dict[str, Any]]:
        """API tokens (names, roles, revocation); never a token or its hash. Admin only."""
        return [
            {
                "name": t.name,
                "role": t.role.value,
                "created_at": t.created_at,
                "created_by": t.created_by,
                "revoked_at": t.revoked_at,
            }
            for t in b.access.list_tokens()
        ]

    # ------------------------------------------------------------------------- verbs

    for verb in VERBS:
        least = Admin if VERB_ROLES.get(verb) is Role.ADMIN else Operator
        _mount_verb(app, b, verb, least, RotationId, rotation_or_404)
    if b.scrape is not None:
        web_metrics.mount(app, b.metrics, b.scrape, Depends(role(Role.VIEWER)))
    from keyturn.web import pages  # the dashboard under /ui (it reuses this module's helpers)

    pages.mount(app, b)
    return app


def _if_match(header: str | None, rotation: Rotation) -> list[str]:
    """The revisions If-Match names (428 when it names none; 412 when `rotation`, as just
    read, has none of them)."""
    if header is None or not header.strip():
        raise _problem(
            428,
            "If-Match is required: send the rotation's revision (GET /v1/rotations/{id} gives "
            "it, and its ETag)",
        )
    given = [t.strip().removeprefix("W/").strip('"') for t in header.split(",")]
    if "*" in given:
        raise _problem(428, "If-Match must name the rotation's revision, not *")
    try:
        operator.check_revision(rotation, given)
    except operator.RevisionChanged as exc:
        raise _problem(412, str(exc)) from None
    return given


def _mount_verb(
    app: FastAPI,
    b: Backend,
    verb: str,
    operator_dep: Any,
    rotation_id_type: Any,
    rotation_or_404: Callable[[str], Rotation],
) -> None:
    action = VERBS[verb]

    async def handler(
        token: operator_dep,
        rotation_id: rotation_id_type,
        body: s.VerbBody,
        request: Request,
        if_match: Annotated[
            str | None,
            Header(
                alias="If-Match",
                description="The rotation's revision (its ETag) as last read; required.",
            ),
        ] = None,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                max_length=200,
                description="Replays the first response to the same key and body.",
            ),
        ] = None,
    ) -> Any:
        rotation = await db(rotation_or_404, rotation_id)
        if if_match is None or not if_match.strip():
            _if_match(if_match, rotation)
        key = idempotency_key.strip() if idempotency_key else None
        if key:
            replay = await _reserve(b, token, key, request.url.path, body.model_dump())
            if replay is not None:
                return replay
        try:
            # the operator service checks the revision on the read its write is a
            # compare-and-set on (re-read and checked again when a worker wrote in between)
            rotation = await db(rotation_or_404, rotation_id)
            revisions = _if_match(if_match, rotation)
            status, result = await _carry_out(
                b, token, rotation, verb, action, body.reason, revisions
            )
        except BaseException:
            if key:
                await db(b.access.release_idempotency, token.name, key)
            raise
        if key:
            await db(b.access.finish_idempotency, token.name, key, status, result)
        return JSONResponse(result, status_code=status)

    app.post(
        f"/v1/rotations/{{rotation_id}}/{verb}",
        response_model=s.VerbResult,
        responses={202: {"model": s.VerbResult, "description": "Requested: the lease "
                         "holder carries it out at its next action boundary"}, **VERB},
        tags=["verbs"],
        name=verb,
        summary=VERB_HELP[verb],
        operation_id=f"rotation_{verb.replace('-', '_')}",
    )(handler)  # fmt: skip


async def _reserve(
    b: Backend, token: ApiToken, key: str, path: str, body: dict[str, Any]
) -> JSONResponse | None:
    """None when `key` is new (now reserved); else the first response to it, replayed."""
    record = IdempotencyRecord(
        token_name=token.name,
        key=key,
        fingerprint=fingerprint("POST", path, body),
        created_at=b.clock.now(),
    )
    found = await db(b.access.reserve_idempotency, record)
    if found is None:
        return None
    if found.fingerprint != record.fingerprint:
        raise _problem(
            422,
            "Idempotency-Key was used with another request (path or body); use a new key for a "
            "new request",
        )
    if found.status_code is None or found.response is None:
        raise _problem(409, "the first request with this Idempotency-Key is still running")
    return JSONResponse(
        found.response, status_code=found.status_code, headers={"Idempotent-Replayed": "true"}
    )


async def _carry_out(
    b: Backend,
    token: ApiToken,
    rotation: Rotation,
    verb: str,
    action: OperatorAction | None,
    reason: str,
    revisions: list[str],
) -> tuple[int, dict[str, Any]]:
    """Do the verb; (status, body). A refusal is recorded in the timeline and is 409; a
    revision that changed before the write landed is 412 (nothing written)."""

    def result(r: Rotation, outcome: str, message: str) -> dict[str, Any]:
        return {
            "rotation": r.id,
            "verb": verb,
            "outcome": outcome,
            "message": message,
            "state": r.state.value,
            "status": status_key(r),
            "revision": revision(r),
        }

    async def refused(message: str) -> tuple[int, dict[str, Any]]:
        await db(
            operator.audit_refusal,
            b.store,
            b.clock,
            rotation,
            verb,
            token.name,
            reason,
            message,
            via="api",
        )
        return 409, {"detail": f"{verb} of rotation {rotation.id} refused: {message}"}

    if action is None:
        try:
            after = await db(
                operator.retry_now, b.store, b.clock, rotation.id, token.name, reason,
                via="api", revisions=revisions,
            )  # fmt: skip
        except operator.RevisionChanged as exc:
            raise _problem(412, str(exc)) from None
        except KeyturnError as exc:
            return await refused(getattr(exc, "reason", str(exc)))
        message = f"retry-now applied; next attempt {render.when(after.next_attempt_at)}"
        return 200, result(after, "applied", message)
    try:
        after, applied = await operator.request_action(
            b.engine_deps(), rotation.id, action, token.name, reason, revisions=revisions
        )
    except operator.RevisionChanged as exc:
        raise _problem(412, str(exc)) from None
    except KeyturnError as exc:
        return await refused(getattr(exc, "reason", str(exc)))
    if applied is None:
        holder = liveness.holder_status(
            after.lease_owner or "",
            await db(b.store.get_workers, [after.lease_owner] if after.lease_owner else []),
            b.clock.now(),
        )
        until = render.when(after.lease_expires_at)
        if action is OperatorAction.RELEASE_LEASE:
            message = (
                f"release-lease requested; the holder ({after.lease_owner}) gives the lease "
                "back at its next action boundary"
                if holder == "live"
                else f"release-lease requested; the holder ({after.lease_owner}) is not seen "
                f"({holder}), and its lease is never cut short: the rotation can be claimed "
                f"when the lease expires ({until}), and the next worker to claim it records "
                "the release"
            )
        else:
            when = (
                "at its next action boundary"
                if holder == "live"
                else f"(it is not seen: the next worker to claim it after its lease ends, "
                f"{until}, does)"
            )
            message = f"{verb} requested; the holder ({after.lease_owner}) carries it out {when}"
        return 202, result(after, "requested", message)
    if applied.outcome != "applied":
        # refused by the state it had moved on to (apply_request recorded it in the timeline)
        return 409, {"detail": f"{verb} of rotation {rotation.id} {applied.outcome}"}
    now_in = f"{after.state.value} ({status_key(after)})"
    return 200, result(after, "applied", f"{verb} applied; rotation is now {now_in}")
