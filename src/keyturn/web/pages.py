"""The on-call dashboard of `keyturn serve`, under /ui: server-rendered pages (Jinja2), plain
forms and one small static script that polls the page it is on (no JavaScript build step).

- Sign-in with an API token (the API's bearer tokens, keyturn.engine.access). The session is
  an opaque random id in an HttpOnly, SameSite=Strict cookie that expires; the server keeps,
  per session, the token's SHA-256 (never the token) and re-reads the token record on every
  request, so a revoked token ends its sessions at once. Sessions live in this process's
  memory: a restart signs everyone out.
- Every form carries the session's CSRF token; a post without it, or from a viewer, is 403.
- Reads use the API's own helpers (keyturn.web.app: ``_detail``, ``_core``, the cursor
  paging) and the store's fleet facts (as /metrics); verbs go through the API's code path
  (``_if_match`` then ``_carry_out``: the operator service, audited with the token's name).
  A verb's form carries the revision the page showed; if the rotation moved since, nothing is
  done and the page says so (a rollback shows its new plan).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape

from keyturn.cli import render
from keyturn.cli.workers import workers_report
from keyturn.domain.errors import KeyturnError, NotFound
from keyturn.domain.lifecycle import State
from keyturn.domain.model import ApiToken, Role, Rotation
from keyturn.domain.schedule import format_duration
from keyturn.engine import operator
from keyturn.engine.access import authenticate, token_hash
from keyturn.engine.attention import STATUSES, attention, status_key
from keyturn.engine.fleet import attention_since, by_state_and_status
from keyturn.engine.run import db
from keyturn.ports import CredentialPager, FleetReader
from keyturn.web import app as api
from keyturn.web import graph

PREFIX = "/ui"
SESSION_COOKIE = "keyturn_session"
LOGIN_COOKIE = "keyturn_login"
#: How long a session lasts from sign-in.
SESSION_SECONDS = 8 * 3600
#: How often a page polls itself (milliseconds; 0: never).
POLL_MS = 2000
#: The slowest a page polls itself, however long it takes to make.
POLL_MAX_MS = 60_000
#: The attention queue shows at most this many rotations (the count says how many there are).
QUEUE_MAX = 50
#: "Soon" for the overview's upcoming rotations.
SOON = timedelta(days=7)
PAGE_SIZE = 50

HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


# ---------------------------------------------------------------------------- sessions


@dataclass
class Session:
    # never in a repr (a traceback, a log line): the hash identifies a token, the CSRF token
    # is a secret of the session
    token_hash: str = field(repr=False)
    csrf: str = field(repr=False)
    expires_at: datetime
    #: One message for the next page this session sees: (level, text).
    flash: tuple[str, str] | None = None


class Sessions:
    """Opaque session ids -> sessions, in memory; expired ones are dropped when met."""

    def __init__(self, now: Callable[[], datetime], seconds: float = SESSION_SECONDS) -> None:
        self.now = now
        self.seconds = seconds
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, hashed: str) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(
            hashed, secrets.token_urlsafe(32), self.now() + timedelta(seconds=self.seconds)
        )
        with self._lock:
            now = self.now()
            for old in [k for k, s in self._by_id.items() if s.expires_at <= now]:
                del self._by_id[old]
            self._by_id[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            session = self._by_id.get(sid)
            if session is not None and session.expires_at <= self.now():
                del self._by_id[sid]
                return None
            return session

    def drop(self, sid: str) -> None:
        with self._lock:
            self._by_id.pop(sid, None)


@dataclass
class Who:
    """The signed-in caller of one request."""

    #: The session's id is its bearer credential: never in a repr.
    sid: str = field(repr=False)
    session: Session
    token: ApiToken

    @property
    def operator(self) -> bool:
        return self.token.role.allows(Role.OPERATOR)

    def may(self, verb: str) -> bool:
        """May this token use `verb` (the API's roles: release-lease is admin only)?"""
        return self.token.role.allows(api.VERB_ROLES.get(verb, Role.OPERATOR))

    def usable(self, verbs: list[str]) -> list[str]:
        """Those of `verbs` this token may use."""
        return [verb for verb in verbs if self.may(verb)]


def _same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


# ------------------------------------------------------------------------------ reading


def _dt(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def utc(value: Any) -> str:
    """The dashboard's one time format: to the second, in UTC, marked."""
    return render.when(_dt(value))


def _verbs(b: api.Backend, r: Rotation, now: datetime) -> list[str]:
    """The verbs that apply to `r` now (as the operator service would validate them)."""
    out = []
    for verb, action in api.VERBS.items():
        if action is None:
            ok = operator.retry_refusal(r, now) is None
        else:
            try:
                ok = operator.applies(b.store, b.registry, r, action)
            except ValueError:  # data its installed kind cannot read: offer nothing
                ok = False
        if ok:
            out.append(verb)
    return out


def _help(why: str, r: Rotation) -> tuple[str, str | None]:
    """The one action that helps a rotation that needs attention: (advice, verb or None)."""
    if why == "halted":
        return "fix the cause, then resume it", "resume"
    if why == "awaiting approval":
        verb = "approve" if "approve" in api.VERBS else None
        return f"approve or deny it (`keyturn rotations approve {r.id} --reason ...`)", verb
    if why.startswith("holder "):
        return "check its worker; the next worker takes it over when the lease ends", None
    if why.endswith("not applied yet"):
        return "check the workers: no live worker has carried the request out", None
    if why.startswith("waiting"):
        return f"look at what it waits for ({r.wait_for or 'a check'})", None
    if why.startswith("retrying"):
        return "read its last error; retry it now once the cause is fixed", "retry-now"
    return "open it", None


def _policies(b: api.Backend) -> Any:
    try:
        return b.engine_deps().schedule
    except KeyturnError:
        return None


def overview(b: api.Backend) -> dict[str, Any]:
    """Counts by state and status, the attention queue (oldest first), upcoming rotations."""
    now = b.clock.now()
    facts = b.store.fleet_facts(now, counters=False) if isinstance(b.store, FleetReader) else None
    if facts is not None:
        counts = by_state_and_status(facts.rotations)
        candidates = list(facts.attention_candidates)
        keys_created = {c: _from_unix(t) for c, t in facts.keys_created.items()}
        next_rotations = {c: _from_unix(t) for c, t in facts.next_rotations.items()}
    else:  # a store without aggregate reads: the same from every rotation
        rotations = b.store.list_rotations()
        counts = {}
        for r in rotations:
            k = (r.state.value, status_key(r))
            counts[k] = counts.get(k, 0) + 1
        candidates = [r for r in rotations if not r.finished]
        keys_created = {
            c.name: c.updated_at for c in b.store.list_credentials() if c.updated_at is not None
        }
        next_rotations = {}
    queue: list[dict[str, Any]] = []
    for r in candidates:
        why = attention(r, now)
        since = attention_since(r, now)
        if why is not None and since is not None:
            queue.append({"since": since, "rotation": r, "why": why})
    book = _policies(b)
    for cred, created in keys_created.items():
        policy = book.policy_of(cred) if book is not None else None
        if policy is not None and policy.max_age is not None and now - created > policy.max_age:
            queue.append(
                {
                    "since": created + policy.max_age,
                    "credential": cred,
                    "why": f"key older than its max_age ({format_duration(policy.max_age)})",
                    "advice": f"rotate it (`keyturn rotate {cred}`)",
                }
            )
    queue.sort(key=lambda q: q["since"])
    total = len(queue)
    shown = queue[:QUEUE_MAX]
    for q in shown:
        if "rotation" in q:
            try:
                full = b.store.get_rotation(q["rotation"].id)
            except NotFound:
                continue
            q["rotation"] = full
            q["advice"], q["verb"] = _help(q["why"], full)
            q["detail"] = full.halted_reason or full.last_error or full.wait_for
        q["age"] = render.age((now - q["since"]).total_seconds())
    soon = sorted((at, c) for c, at in next_rotations.items() if at - now <= SOON)
    states = [s.value for s in State]
    statuses = [s for s in STATUSES if any(k[1] == s for k in counts)]
    return {
        "now": now,
        "counts": counts,
        "states": states,
        "statuses": statuses,
        "total": sum(counts.values()),
        "queue": shown,
        "queue_total": total,
        "soon": [
            {"credential": c, "at": at, "in": render.age((at - now).total_seconds())}
            for at, c in soon[:20]
        ],
    }


def _from_unix(t: float) -> datetime:
    from datetime import UTC

    return datetime.fromtimestamp(t, UTC)


def rotations_page(b: api.Backend, query: dict[str, str]) -> dict[str, Any]:
    now = b.clock.now()
    state = query.get("state") or None
    status = query.get("status") or None
    credential = query.get("credential") or None
    kind = query.get("kind") or None
    holder = query.get("holder") or None
    only = query.get("attention") == "1"
    problems = []
    limit = PAGE_SIZE
    if query.get("limit"):
        try:
            limit = int(query["limit"])
        except ValueError:
            limit = 0
        if not 1 <= limit <= api.MAX_PAGE:
            problems.append(f"limit {query['limit']!r}: give 1 to {api.MAX_PAGE} rotations a page")
            limit = PAGE_SIZE
    state_enum = None
    if state is not None:
        try:
            state_enum = State(state)
        except ValueError:
            problems.append(f"state {state!r} is not a state")
    if status is not None and status not in STATUSES:
        problems.append(f"status {status!r} is not a status")
    items: list[dict[str, Any]] = []
    next_cursor = None
    if not problems:
        cursor = query.get("cursor") or None
        page: list[Rotation] = []
        try:
            # the API's list: filters, cursor and limit in the store's query, the status and
            # attention definitions of keyturn.engine.attention deciding on what it returns
            page, more = operator.list_rotations(
                b.store,
                now,
                state=state_enum,
                status=status,
                credential=credential,
                kind=kind,
                holder=holder,
                attention_only=only,
                before=api._cursor_key(cursor) if cursor else None,
                limit=limit,
            )
            next_cursor = api._cursor_of(page[-1]) if more and page else None
        except HTTPException as exc:
            problems.append(str(exc.detail))
        items = [api._core(r, now) for r in page]
    kept = {
        k: v
        for k, v in {
            "state": state,
            "status": status,
            "credential": credential,
            "kind": kind,
            "holder": holder,
            "attention": "1" if only else None,
            "limit": str(limit) if query.get("limit") and limit != PAGE_SIZE else None,
        }.items()
        if v
    }
    return {
        "rows": items,
        "filters": kept,
        "states": [s.value for s in State],
        "statuses": list(STATUSES),
        "kinds": sorted(b.registry.kinds),
        "problems": problems,
        "next_url": f"{PREFIX}/rotations?{urlencode({**kept, 'cursor': next_cursor})}"
        if next_cursor
        else None,
        "first_url": f"{PREFIX}/rotations?{urlencode(kept)}" if query.get("cursor") else None,
    }


async def _act(
    b: api.Backend, token: ApiToken, rotation: Rotation, verb: str, reason: str, shown: str
) -> tuple[Rotation, tuple[int, dict[str, Any]] | None]:
    """A verb through the API's code path, bound to the revision the page showed: the rotation
    (read again when it moved) and (status, result), or None when the rotation moved since the
    page (its revision no longer `shown`, or a write landed between the check and the verb's
    compare-and-set: the API's 412)."""
    try:
        revisions = api._if_match(f'"{shown}"' if shown else None, rotation)
    except HTTPException:
        return rotation, None
    status, result = await api._carry_out(
        b, token, rotation, verb, api.VERBS[verb], reason, revisions
    )
    if status == 412:
        return await db(b.store.get_rotation, rotation.id), None
    return rotation, (status, result)


def rotation_page(b: api.Backend, r: Rotation) -> dict[str, Any]:
    now = b.clock.now()
    doc = api._detail(b, r)
    return {
        "r": doc,
        "verbs": _verbs(b, r, now),
        "graph": graph.svg(r.state, rollback_from=r.rollback_from),
        "short": r.id,
    }


def plan_page(b: api.Backend, r: Rotation) -> dict[str, Any]:
    try:
        plan: dict[str, Any] | None = b.rollback_plan(r.id)
        refusal = None
    except KeyturnError as exc:
        plan, refusal = None, str(exc)
    return {
        "r": api._core(r, b.clock.now()),
        "plan": plan,
        "refusal": refusal,
    }


def credentials_page(b: api.Backend, after: str | None = None) -> dict[str, Any]:
    """A page of credentials (by name, after `after`): each with its key's age, last success
    and latest rotation, next slot, policy, targets and probes."""
    now = b.clock.now()
    book = _policies(b)
    try:
        deps: Any = b.engine_deps()
    except KeyturnError:
        deps = None
    if isinstance(b.store, CredentialPager):  # a page (and one more, to know there is a next)
        every = b.store.page_credentials(limit=PAGE_SIZE + 1, after=after)
    else:
        every = [c for c in b.store.list_credentials() if after is None or c.name > after]
        every.sort(key=lambda c: c.name)
    shown = every[:PAGE_SIZE]
    names = [c.name for c in shown]
    slots = getattr(deps, "slots", None) if deps is not None else None
    if slots is not None:
        nexts = {c: s.due_at for c, s in slots.scheduled_slots(names).items()}
    elif isinstance(b.store, FleetReader):
        facts = b.store.fleet_facts(now, counters=False)
        nexts = {c: _from_unix(t) for c, t in facts.next_rotations.items()}
    else:
        nexts = {}
    rows = []
    for c in shown:
        latest = b.store.latest_rotation(c.name)
        done = b.store.list_rotations(credential=c.name, state=State.OLD_DEACTIVATED)
        last = done[0].finished_at if done else None
        policy = book.policy_of(c.name) if book is not None else None
        targets: list[str] = []
        probes: list[str] = []
        if deps is not None:
            try:
                cfg = deps.config(c.name)
                targets = [f"{t.name or t.type} ({t.type})" for t in cfg.targets]
                probes = [f"{getattr(p, 'name', None) or p.type} ({p.type})" for p in cfg.probes]
            except KeyturnError:
                targets = ["(not in the configuration)"]
        rows.append(
            {
                "name": c.name,
                "kind": c.kind,
                "provider": c.provider,
                "algorithm": c.algorithm,
                "key_age": render.age((now - c.updated_at).total_seconds())
                if c.updated_at
                else "-",
                "key_created": c.updated_at,
                "last": last,
                "latest": latest,
                "latest_status": status_key(latest) if latest else None,
                "next": nexts.get(c.name),
                "policy": _describe_policy(policy),
                "targets": targets,
                "probes": probes,
            }
        )
    more = len(every) > len(shown)
    return {
        "rows": rows,
        "next_url": f"{PREFIX}/credentials?{urlencode({'after': shown[-1].name})}"
        if more and shown
        else None,
        "first_url": f"{PREFIX}/credentials" if after else None,
    }


#: A campaign's page lists at most this many of its rotations (the counts cover them all).
CAMPAIGN_ROWS = 500


def campaigns_page(b: api.Backend, chosen: str | None) -> dict[str, Any]:
    """Every campaign's progress (engine.campaigns, as the CLI and /metrics count it); for the
    campaign `chosen`, its rotations too (the first CAMPAIGN_ROWS), each with its progress."""
    from keyturn.engine.campaigns import progress

    now = (b.schedule_now or b.clock.now)()
    counts = progress(b.store, b.registry, now, chosen)
    rows: list[dict[str, Any]] = []
    if chosen is not None and counts:
        for r in b.store.campaign_rotations(chosen)[:CAMPAIGN_ROWS]:
            rows.append(
                {
                    "id": r.id,
                    "credential": r.credential,
                    "state": r.state.value,
                    "progress": b.registry.kind(r.kind).progress_label(r, now),
                    "status": render.status_of(r),
                    "updated_at": r.updated_at,
                }
            )
    return {"campaigns": counts, "chosen": chosen, "rows": rows, "limit": CAMPAIGN_ROWS}


def _describe_policy(policy: Any) -> str:
    if policy is None:
        return "none (rotated by hand)"
    words = [policy.name]
    if policy.every is not None:
        words.append(f"every {format_duration(policy.every)}")
    if policy.cron is not None:
        words.append(f"cron {policy.cron} ({policy.timezone})")
    if policy.max_age is not None:
        words.append(f"max_age {format_duration(policy.max_age)}")
    if policy.approval != "none":
        words.append(f"approval {policy.approval}")
    return ", ".join(words)


# ------------------------------------------------------------------------------ the app


def mount(app: FastAPI, b: api.Backend) -> None:  # noqa: C901 (one nested function per route)
    """The dashboard's routes under /ui (out of the OpenAPI document) and its static files."""
    env = Environment(
        loader=PackageLoader("keyturn.web", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["utc"] = utc
    env.filters["age"] = render.age
    env.globals["prefix"] = PREFIX
    sessions = Sessions(b.clock.now)
    app.mount(
        f"{PREFIX}/static",
        StaticFiles(packages=[("keyturn.web", "static")]),
        name="dashboard-static",
    )

    def who_of(request: Request) -> Who | None:
        sid = request.cookies.get(SESSION_COOKIE)
        session = sessions.get(sid)
        if session is None or sid is None:
            return None
        token = b.access.token_by_hash(session.token_hash)
        if token is None or token.revoked_at is not None:
            sessions.drop(sid)
            return None
        return Who(sid, session, token)

    def page(
        name: str,
        who: Who | None,
        status: int = 200,
        *,
        live: bool = False,
        started: float | None = None,
        request: Request | None = None,
        **ctx: Any,
    ) -> HTMLResponse:
        poll = 0
        if live:
            # a page that costs the server more is polled less often (at most a fifth of
            # the server's time goes to one page polled by one browser)
            spent = time.perf_counter() - started if started is not None else 0.0
            poll = min(POLL_MAX_MS, max(POLL_MS, round(spent * 5000)))
        flash = None
        # a page's own poll (live.js) leaves the message for the page a person opens
        polled = request is not None and request.headers.get("x-keyturn-live") == "1"
        if who is not None and who.session.flash is not None and not polled:
            flash, who.session.flash = who.session.flash, None
        html = env.get_template(name).render(
            who=who,
            flash=flash,
            poll_ms=poll,
            csrf=who.session.csrf if who is not None else None,
            **ctx,
        )
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    def to_login(request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(
            f"{PREFIX}/login?{urlencode({'next': target})}", 303, headers=HEADERS
        )

    def forbidden(who: Who | None, why: str) -> HTMLResponse:
        return page("error.html", who, 403, title="Forbidden", message=why)

    def not_found(who: Who | None, why: str) -> HTMLResponse:
        return page("error.html", who, 404, title="Not found", message=why)

    async def form_of(request: Request) -> dict[str, str]:
        raw = (await request.body()).decode("utf-8", "replace")
        return {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}

    # ------------------------------------------------------------------ sign-in

    def login_form(next_url: str, status: int = 200, error: str | None = None) -> HTMLResponse:
        nonce = secrets.token_urlsafe(24)
        resp = page("login.html", None, status, next_url=next_url, nonce=nonce, error=error)
        resp.set_cookie(
            LOGIN_COOKIE, nonce, max_age=600, httponly=True, samesite="strict", path=PREFIX
        )
        return resp

    def safe_next(value: str | None) -> str:
        value = value or f"{PREFIX}/"
        ok = value.startswith(PREFIX + "/") and not value.startswith("//") and "\\" not in value
        return value if ok else f"{PREFIX}/"

    @app.get(PREFIX, include_in_schema=False)
    def ui_root() -> Response:
        return RedirectResponse(f"{PREFIX}/", 307)

    @app.get(f"{PREFIX}/login", include_in_schema=False)
    def login_get(request: Request) -> Response:
        return login_form(safe_next(request.query_params.get("next")))

    @app.post(f"{PREFIX}/login", include_in_schema=False)
    async def login_post(request: Request) -> Response:
        form = await form_of(request)
        next_url = safe_next(form.get("next"))
        if not _same(form.get("csrf"), request.cookies.get(LOGIN_COOKIE)):
            return forbidden(None, "the sign-in form has expired or was not sent by this site; "
                             "open the sign-in page again")  # fmt: skip
        token = (form.get("token") or "").strip()
        found = await db(authenticate, b.access, token) if token else None
        if found is None:
            return login_form(next_url, 401, "that token is unknown or revoked")
        sid, _ = sessions.create(token_hash(token))
        resp = RedirectResponse(next_url, 303, headers=HEADERS)
        resp.set_cookie(
            SESSION_COOKIE,
            sid,
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=PREFIX,
        )
        resp.delete_cookie(LOGIN_COOKIE, path=PREFIX)
        return resp

    @app.post(f"{PREFIX}/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        form = await form_of(request)
        who = await db(who_of, request)
        if who is None or not _same(form.get("csrf"), who.session.csrf):
            return forbidden(who, "sign-out needs the form of a signed-in page")
        sessions.drop(who.sid)
        resp = RedirectResponse(f"{PREFIX}/login", 303, headers=HEADERS)
        resp.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return resp

    # -------------------------------------------------------------------- pages

    @app.get(f"{PREFIX}/", include_in_schema=False)
    def overview_get(request: Request) -> Response:
        started = time.perf_counter()
        who = who_of(request)
        if who is None:
            return to_login(request)
        ctx = overview(b)
        return page(
            "overview.html",
            who,
            live=True,
            o=ctx,
            title="Overview",
            started=started,
            request=request,
        )

    @app.get(f"{PREFIX}/rotations", include_in_schema=False)
    def rotations_get(request: Request) -> Response:
        started = time.perf_counter()
        who = who_of(request)
        if who is None:
            return to_login(request)
        ctx = rotations_page(b, dict(request.query_params))
        status = 400 if ctx["problems"] else 200
        return page(
            "rotations.html",
            who,
            status,
            live=True,
            p=ctx,
            title="Rotations",
            started=started,
            request=request,
        )

    @app.get(f"{PREFIX}/rotations/{{rotation_id}}", include_in_schema=False)
    def rotation_get(request: Request, rotation_id: str) -> Response:
        started = time.perf_counter()
        who = who_of(request)
        if who is None:
            return to_login(request)
        try:
            r = b.store.get_rotation(rotation_id)
        except NotFound:
            return not_found(who, f"no rotation with id {rotation_id!r}")
        ctx = rotation_page(b, r)
        title = f"Rotation {r.id}"
        return page("rotation.html", who, live=True, title=title, started=started,
                    request=request, **ctx)  # fmt: skip

    @app.get(f"{PREFIX}/rotations/{{rotation_id}}/rollback", include_in_schema=False)
    def rollback_get(request: Request, rotation_id: str) -> Response:
        who = who_of(request)
        if who is None:
            return to_login(request)
        try:
            r = b.store.get_rotation(rotation_id)
        except NotFound:
            return not_found(who, f"no rotation with id {rotation_id!r}")
        return page("rollback.html", who, title=f"Roll back {r.id}", **plan_page(b, r))

    @app.get(f"{PREFIX}/credentials", include_in_schema=False)
    def credentials_get(request: Request) -> Response:
        started = time.perf_counter()
        who = who_of(request)
        if who is None:
            return to_login(request)
        ctx = credentials_page(b, request.query_params.get("after") or None)
        return page("credentials.html", who, live=True, title="Credentials", started=started,
                    request=request, **ctx)  # fmt: skip

    @app.get(f"{PREFIX}/workers", include_in_schema=False)
    def workers_get(request: Request) -> Response:
        started = time.perf_counter()
        who = who_of(request)
        if who is None:
            return to_login(request)
        rows = workers_report(b.store, b.clock.now())
        return page(
            "workers.html",
            who,
            live=True,
            title="Workers",
            rows=rows,
            started=started,
            request=request,
        )

    @app.get(f"{PREFIX}/campaigns", include_in_schema=False)
    def campaigns_get(request: Request) -> Response:
        started = time.perf_counter()
        who = who_of(request)
        if who is None:
            return to_login(request)
        chosen = request.query_params.get("campaign") or None
        ctx = campaigns_page(b, chosen)
        if chosen is not None and not ctx["campaigns"]:
            return not_found(who, f"no campaign named {chosen!r}")
        return page("campaigns.html", who, live=True, title="Campaigns", started=started,
                    request=request, **ctx)  # fmt: skip

    # -------------------------------------------------------------------- verbs

    @app.post(f"{PREFIX}/rotations/{{rotation_id}}/{{verb}}", include_in_schema=False)
    async def verb_post(request: Request, rotation_id: str, verb: str) -> Response:
        who = await db(who_of, request)
        form = await form_of(request)
        if who is None:
            return forbidden(None, "sign in first: this form needs a signed-in session")
        if not _same(form.get("csrf"), who.session.csrf):
            return forbidden(who, "the form carried no valid CSRF token; reload the page and "
                             "try again")  # fmt: skip
        if not who.operator:
            return forbidden(
                who,
                f"token {who.token.name} has role {who.token.role.value}; {verb} needs "
                "operator or above",
            )
        if verb not in api.VERBS:
            return not_found(who, f"no verb {verb!r}; use one of {', '.join(api.VERBS)}")
        if not who.may(verb):
            return forbidden(
                who,
                f"token {who.token.name} has role {who.token.role.value}; {verb} needs "
                f"{api.VERB_ROLES[verb].value}",
            )
        try:
            rotation = await db(b.store.get_rotation, rotation_id)
        except NotFound:
            return not_found(who, f"no rotation with id {rotation_id!r}")
        reason = " ".join((form.get("reason") or "").split())
        shown = (form.get("revision") or "").strip()

        async def again(status: int, level: str, message: str) -> Response:
            who.session.flash = (level, message)
            if verb == "rollback":
                ctx = await db(plan_page, b, rotation)
                return page("rollback.html", who, status, title=f"Roll back {rotation.id}", **ctx)
            ctx = await db(rotation_page, b, rotation)
            return page("rotation.html", who, status, live=True, title=f"Rotation {rotation.id}",
                        **ctx)  # fmt: skip

        if not reason:
            return await again(422, "error", f"{verb}: a reason is required for every "
                               "operator action; nothing changed")  # fmt: skip
        rotation, done = await _act(b, who.token, rotation, verb, reason, shown)
        if done is None:
            return await again(
                409,
                "error",
                f"rotation {rotation.id} moved since the page you acted on (it is now "
                f"{rotation.state.value}, {status_key(rotation)}); nothing changed: "
                + ("review the new plan below and confirm again"
                   if verb == "rollback" else "review it and decide again"),
            )  # fmt: skip
        status, result = done
        if status >= 400:
            rotation = await db(b.store.get_rotation, rotation_id)
            return await again(status, "error", str(result.get("detail", "refused")))
        who.session.flash = ("ok", str(result["message"]))
        return RedirectResponse(f"{PREFIX}/rotations/{rotation.id}", 303, headers=HEADERS)
