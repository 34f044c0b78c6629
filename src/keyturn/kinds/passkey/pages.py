"""The passkey user pages: what an end user opens from a rotation's link.

Served on `keyturn serve`'s user listener (its own origin, no operator routes) and, for a
domain move, on the new domain's host name too: every request's origin must be the task's
`origin` or `new_origin`. keyturn holds no passkey: the pages relay the provider's challenges
to the browser (``navigator.credentials``) and check every assertion comes from the passkey
the step needs, and from this rotation's user, before it reaches the provider.

- ``GET /l/{token}`` opens a link: a new page session (opaque id in an HttpOnly, SameSite=Strict
  cookie, in memory, about 30 minutes, bound to the rotation and the link's hash; opening the
  link again ends the rotation's previous session), then the task page at ``/task`` (the token
  is never kept in a URL, the history, a log or a Referer).
- ``GET /task``: the step the user is at (sign in, register, prove, move, deactivate, roll back,
  done), a button for it; ``passkey.js`` runs a step with ``POST /api/begin`` (a WebAuthn
  request or creation for the browser) and ``POST /api/finish`` (the browser's answer) until
  the step is done, then reloads the page.
- ``GET /move`` on the new origin of a domain move: the code and a one-time hand-off token
  arrive in the URL fragment; ``POST /api/handoff`` turns them into a session there and the
  creation options of the new passkey (the code is used at once, never stored).
- ``POST /api/snooze``: "remind me later".

Signing in with the old passkey is its LAST signature: it signs Create Credential Code (the code
is created then, while the user is here, and never stored), and the new passkey is registered
with the code (Create Credential With Code), as in the domain move. The direct order (the
browser makes the new passkey, then the old one signs Create Credential) would lock a user out
on the very device that holds the old passkey: an authenticator replaces a discoverable
credential of the same rpId and user handle by the new one, so the old one could no longer
sign. ``register`` (the direct Create Credential) is kept for a session whose sign-in came
before this rule.

JSON endpoints need the session's CSRF token in ``X-CSRF-Token`` and a same-origin ``Origin``.
Each request reads the task afresh and refuses (one sentence) a session whose link was
superseded, whose task changed, or whose rotation is no longer actionable. Never shown or
logged: link tokens, codes, delegated tokens, user-action tokens, session ids.
"""

from __future__ import annotations

import base64
import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from keyturn.kinds.passkey.tasks import (
    OLD_DEACTIVATED,
    PROVEN,
    REGISTERED,
    ROLLED_BACK,
    SNOOZED,
    LinkRefused,
    LinkTask,
    PasskeyTasks,
    link_hash,
    passkey_name,
)
from keyturn.plugin import (
    PasskeyChallenge,
    PasskeyCreation,
    PasskeyProvider,
    ProviderCredential,
    ProviderError,
    SignedCall,
    UserPasskeys,
)

log = logging.getLogger("keyturn.passkey.pages")

HERE = Path(__file__).parent
SESSION_COOKIE = "kt_passkey"
SESSION_SECONDS = 30 * 60
HANDOFF_SECONDS = 120
MAX_SESSIONS = 10_000
#: How long the browser may take over one WebAuthn prompt (ms).
PROMPT_MS = 120_000

HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}

EXPIRED = "This page has expired. Open the link from your message again."
STALE = "This page is out of date. Reload it to see where you are."
NOT_YOURS = (
    "That passkey is not the one this step needs: use your own passkey for this account. "
    "Nothing was changed."
)
PROVIDER_FAILED = "The passkey service could not complete this step. Nothing was lost; try again."
WRONG_ORIGIN = "This link does not belong to this website."
FINISHED = "There is nothing left to do: this passkey change is finished."


class Refused(Exception):
    """A request the pages refuse: one sentence for the person, and the status."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class Pending:
    """The browser's next answer in a step: a creation (`creation`) or an assertion over
    `challenge` by the passkey `expect`."""

    stage: str
    creation: PasskeyCreation | None = None
    challenge: PasskeyChallenge | None = None
    expect: str | None = None
    via_code: bool = False


@dataclass
class Session:
    sid: str = field(repr=False)
    rotation_id: str
    link_hash: str = field(repr=False)
    task: str
    origin: str
    csrf: str = field(repr=False)
    expires: float
    signed_in: bool = False
    pending: Pending | None = None
    notice: str | None = None


@dataclass
class Handoff:
    rotation_id: str
    link_hash: str = field(repr=False)
    task: str
    expires: float


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.url.netloc}"


def _snoozes(task: LinkTask) -> int:
    counts = [
        int(n)
        for name in task.evidence
        if name.startswith(f"{SNOOZED}:")
        for n in [name.partition(":")[2]]
        if n.isdigit()
    ]
    return max(counts, default=0)


# ------------------------------------------------------------------------------- stages


def stage_of(task: LinkTask, session: Session, origin: str) -> str:
    """The step the user is at on this origin, from the evidence (what is already done is
    never asked again)."""
    ev = task.evidence
    if task.finished:
        return "done"
    if task.task == "rollback":
        return "done" if ROLLED_BACK in ev else "rollback"
    if task.task == "deactivate":
        return "done" if OLD_DEACTIVATED in ev else "deactivate"
    if OLD_DEACTIVATED in ev:
        return "done"
    moving = task.new_origin is not None
    if PROVEN in ev and not task.may_deactivate:
        return "done-for-now"
    if moving and origin == task.origin:
        return "continue" if REGISTERED in ev else "move"
    if REGISTERED not in ev:
        if moving:
            return "reopen"  # on the new origin without a code: start again from the link
        return "signin"  # signing in and registering are one step (see the module's notes)
    return "prove"


BUTTONS = {
    "signin": "Sign in with your current passkey",
    "move": "Sign in with your current passkey",
    "register": "Register your new passkey",
    "prove": "Use your new passkey",
    "continue": "Continue",
    "deactivate": "Sign in with your new passkey",
    "rollback": "Undo the passkey change",
}


# ------------------------------------------------------------------------ browser shapes


def request_options(challenge: PasskeyChallenge, credential: ProviderCredential) -> dict[str, Any]:
    """navigator.credentials.get's publicKey options (binary fields base64url): the challenge
    string's UTF-8 bytes, as Dfns' browser SDK signs it; only `credential` is allowed."""
    options: dict[str, Any] = {
        "challenge": _b64u(challenge.challenge.encode()),
        "allowCredentials": [{"type": "public-key", "id": credential.credential_id}],
        "userVerification": challenge.user_verification or "required",
        "timeout": PROMPT_MS,
    }
    if credential.relying_party_id:
        options["rpId"] = credential.relying_party_id
    return options


def creation_options(creation: PasskeyCreation, replaces: str | None = None) -> dict[str, Any]:
    """navigator.credentials.create's publicKey options. The passkey being replaced
    (`replaces`) is left out of excludeCredentials: the new one may live on the same device
    (a new key pair for the same account, which is what a rotation is)."""
    raw = creation.options
    rp = raw.get("rp") if isinstance(raw.get("rp"), Mapping) else {}
    user = raw.get("user") if isinstance(raw.get("user"), Mapping) else {}
    assert isinstance(rp, Mapping) and isinstance(user, Mapping)
    exclude = raw.get("excludeCredentials") or []
    return {
        "challenge": _b64u(creation.challenge.encode()),
        "rp": {"id": rp.get("id") or creation.rp_id, "name": rp.get("name") or "keyturn"},
        "user": {
            "id": _b64u(str(user.get("id") or creation.user_id or "").encode()),
            "name": str(user.get("name") or ""),
            "displayName": str(user.get("displayName") or user.get("name") or ""),
        },
        "pubKeyCredParams": list(
            raw.get("pubKeyCredParams") or [{"type": "public-key", "alg": -7}]
        ),
        "excludeCredentials": [
            {"type": "public-key", "id": str(c.get("id"))}
            for c in exclude
            if isinstance(c, Mapping) and c.get("id") and c.get("id") != replaces
        ],
        "authenticatorSelection": dict(raw.get("authenticatorSelection") or {}),
        "attestation": "none",
        "timeout": PROMPT_MS,
    }


def _text(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 20_000:
        raise Refused("The browser's answer is incomplete; try again.", 400)
    return value


def first_factor(answer: Mapping[str, Any]) -> tuple[str, str | None, dict[str, Any]]:
    """(credential id, userHandle, /auth/action's firstFactor) from the browser's assertion."""
    response = answer.get("response")
    if not isinstance(response, Mapping):
        raise Refused("The browser's answer is incomplete; try again.", 400)
    cred_id = _text(answer.get("id"))
    handle = response.get("userHandle")
    assertion = {
        "credId": cred_id,
        "clientData": _text(response.get("clientDataJSON")),
        "authenticatorData": _text(response.get("authenticatorData")),
        "signature": _text(response.get("signature")),
    }
    if isinstance(handle, str) and handle:
        assertion["userHandle"] = handle
    return (
        cred_id,
        handle if isinstance(handle, str) else None,
        {
            "kind": "Fido2",
            "credentialAssertion": assertion,
        },
    )


def credential_info(answer: Mapping[str, Any]) -> dict[str, str]:
    response = answer.get("response")
    if not isinstance(response, Mapping):
        raise Refused("The browser's answer is incomplete; try again.", 400)
    return {
        "credId": _text(answer.get("id")),
        "clientData": _text(response.get("clientDataJSON")),
        "attestationData": _text(response.get("attestationObject")),
    }


def check_assertion(
    cred_id: str, handle: str | None, expect: str | None, user_id: str | None
) -> None:
    """The assertion comes from the passkey the step needs (one of this user's, by its id at
    the provider) and, when the authenticator returns a userHandle (a discoverable passkey
    does; a non-discoverable one may not), it names this user. Checked before anything
    reaches the provider."""
    if expect is None or not hmac.compare_digest(cred_id, expect):
        raise Refused(NOT_YOURS)
    if handle is None:
        return
    if user_id is None:
        raise Refused(NOT_YOURS)
    try:
        named = _b64u_decode(handle)
    except ValueError:
        raise Refused(NOT_YOURS) from None
    if not hmac.compare_digest(named, user_id.encode()):
        raise Refused(NOT_YOURS)


# ---------------------------------------------------------------------------------- app


class UserPages:
    def __init__(self, tasks: PasskeyTasks, *, secure_cookies: bool, root: str = "") -> None:
        self.tasks = tasks
        self.secure = secure_cookies
        #: The path the app is mounted at on its origin ("" at the root, "/passkey" on keyturn
        #: serve's user listener): every URL the pages and their script use starts with it.
        self.root = root.rstrip("/")
        self.sessions: dict[str, Session] = {}
        self.by_rotation: dict[str, str] = {}
        self.handoffs: dict[str, Handoff] = {}
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.globals["root"] = self.root

    # ------------------------------------------------------------------------- plumbing

    def html(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        body = self.env.get_template(template).render(**context)
        return HTMLResponse(body, status, headers=HEADERS)

    def refused_page(self, message: str, status: int) -> HTMLResponse:
        return self.html("refused.html", status, message=message)

    @staticmethod
    def json(data: Mapping[str, Any], status: int = 200) -> JSONResponse:
        return JSONResponse(dict(data), status, headers=HEADERS)

    def _prune(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self.sessions.items() if v.expires < now]:
            self._end(sid)
        for h in [h for h, v in self.handoffs.items() if v.expires < now]:
            del self.handoffs[h]
        while len(self.sessions) >= MAX_SESSIONS:
            self._end(min(self.sessions, key=lambda s: self.sessions[s].expires))

    def _end(self, sid: str) -> None:
        session = self.sessions.pop(sid, None)
        if session is not None and self.by_rotation.get(session.rotation_id) == sid:
            del self.by_rotation[session.rotation_id]

    def _new_session(self, task: LinkTask, origin: str, hashed: str) -> Session:
        self._prune()
        previous = self.by_rotation.get(task.rotation_id)
        if previous is not None:
            self._end(previous)
        session = Session(
            sid=secrets.token_urlsafe(32),
            rotation_id=task.rotation_id,
            link_hash=hashed,
            task=task.task,
            origin=origin,
            csrf=secrets.token_urlsafe(24),
            expires=time.monotonic() + SESSION_SECONDS,
        )
        self.sessions[session.sid] = session
        self.by_rotation[task.rotation_id] = session.sid
        return session

    def _set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            session.sid,
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            # Secure whenever the page is served over https (always behind a real domain)
            secure=self.secure or session.origin.startswith("https://"),
            path="/",
        )

    def _session(self, request: Request) -> Session:
        sid = request.cookies.get(SESSION_COOKIE)
        session = self.sessions.get(sid) if sid else None
        if session is None or session.expires < time.monotonic():
            if sid:
                self._end(sid)
            raise Refused(EXPIRED)
        if session.origin != _origin(request):
            raise Refused(EXPIRED)
        return session

    async def _current(self, session: Session, origin: str, *, viewing: bool = False) -> LinkTask:
        """The task now; Refused when the session no longer matches it, or, unless `viewing`
        (the task page), when the rotation is finished (no step is left)."""
        try:
            task = await self.tasks.task(session.rotation_id)
        except LinkRefused as exc:
            self._end(session.sid)
            raise Refused(str(exc), 409) from None
        if not hmac.compare_digest(task.link_hash, session.link_hash):
            self._end(session.sid)
            raise Refused("A newer link was sent for this; use the newest one.", 409)
        if task.task != session.task:
            self._end(session.sid)
            raise Refused(EXPIRED, 409)
        if origin not in (task.origin, task.new_origin):
            raise Refused(WRONG_ORIGIN)
        if task.finished and not viewing:
            raise Refused(FINISHED, 409)
        return task

    def _json_guard(self, request: Request) -> Session:
        origin = _origin(request)
        if request.headers.get("origin") != origin:
            raise Refused("This request did not come from this page.")
        session = self._session(request)
        sent = request.headers.get("x-csrf-token") or ""
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise Refused("This request did not come from this page.")
        return session

    @staticmethod
    async def _body(request: Request) -> Mapping[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise Refused("The request is not JSON.", 400) from None
        if not isinstance(data, Mapping):
            raise Refused("The request is not a JSON object.", 400)
        return data

    async def _provider(self, rotation_id: str) -> PasskeyProvider:
        return cast(PasskeyProvider, await self.tasks.provider(rotation_id))

    def _boundary(self, name: str) -> None:
        """After a write at the provider, before its evidence is recorded: where a crash test
        kills the server (a tasks object without `boundary` has none)."""
        mark = getattr(self.tasks, "boundary", None)
        if mark is not None:
            mark(name)

    async def _record(self, task: LinkTask, name: str, detail: Mapping[str, Any]) -> None:
        if name in task.evidence:
            return
        if await self.tasks.record(task.rotation_id, name, detail):
            log.info("passkey rotation %s: %s recorded", task.rotation_id, name)

    # --------------------------------------------------------------------------- routes

    async def open_link(self, request: Request) -> Response:
        token = request.path_params["token"]
        origin = _origin(request)
        try:
            task = await self.tasks.open_link(token)
        except LinkRefused as exc:
            log.info("a passkey link was refused")
            return self.refused_page(str(exc), 410)
        if origin not in (task.origin, task.new_origin):
            return self.refused_page(WRONG_ORIGIN, 403)
        session = self._new_session(task, origin, link_hash(token))
        log.info("passkey rotation %s: link opened (%s)", task.rotation_id, task.task)
        # a page (not a redirect) moves on to /task, so the navigation there is same-site and
        # the SameSite=Strict cookie goes with it even when the link came from a mail client
        response = self.html("continue.html")
        self._set_cookie(response, session)
        return response

    async def task_page(self, request: Request) -> Response:
        origin = _origin(request)
        try:
            session = self._session(request)
            task = await self._current(session, origin, viewing=True)
        except Refused as exc:
            return self.refused_page(exc.message, exc.status)
        stage = stage_of(task, session, origin)
        notice, session.notice = session.notice, None
        return self.html(
            "task.html",
            task=task,
            stage=stage,
            button=BUTTONS.get(stage),
            csrf=session.csrf,
            notice=notice,
            may_snooze=stage in ("signin", "move") and task.task == "enrol",
            new_host=task.new_origin.split("://", 1)[-1] if task.new_origin else None,
        )

    async def move_page(self, request: Request) -> Response:
        return self.html("move.html", origin=_origin(request))

    async def api(self, request: Request) -> Response:
        """Every JSON endpoint: the guard, the fresh task, one sentence on refusal."""
        kind = request.path_params["kind"]
        handler: Callable[[Request], Awaitable[Mapping[str, Any]]] | None = {
            "begin": self.begin,
            "finish": self.finish,
            "snooze": self.snooze,
            "handoff": self.handoff,
        }.get(kind)
        if handler is None:
            return self.json({"error": "Not found."}, 404)
        try:
            response = self.json(await handler(request))
            opened = getattr(request.state, "opened", None)
            if isinstance(opened, Session):
                self._set_cookie(response, opened)
            return response
        except Refused as exc:
            return self.json({"error": exc.message}, exc.status)
        except LinkRefused as exc:
            return self.json({"error": str(exc)}, 409)
        except ProviderError as exc:
            log.warning(
                "passkey pages: the provider refused or failed (%s, status %s)",
                type(exc).__name__,
                getattr(exc, "status", None),
            )
            status = getattr(exc, "status", None)
            if status == 401:
                return self.json({"error": NOT_YOURS}, 403)
            return self.json({"error": PROVIDER_FAILED}, 502)

    # ---------------------------------------------------------------------------- steps

    async def _user(
        self, provider: PasskeyProvider, task: LinkTask
    ) -> tuple[UserPasskeys, str | None]:
        user = await provider.login(task.username)
        user_id = task.user_id or user.user_id
        if task.user_id and user.user_id and task.user_id != user.user_id:
            raise Refused(NOT_YOURS)
        return user, user_id

    @staticmethod
    def _find(
        creds: list[ProviderCredential], task: LinkTask
    ) -> tuple[ProviderCredential | None, ProviderCredential | None]:
        """(the old passkey, the new one: by uuid once known, else by its name)."""
        old = next((c for c in creds if c.credential_uuid == task.old_credential_uuid), None)
        name = passkey_name(task.rotation_id)
        new = next(
            (
                c
                for c in creds
                if (task.new_credential_uuid and c.credential_uuid == task.new_credential_uuid)
                or (not task.new_credential_uuid and c.name == name and c.kind == "Fido2")
            ),
            None,
        )
        return old, new

    @staticmethod
    def _registered(new: ProviderCredential) -> dict[str, Any]:
        return {
            "credential_id": new.credential_id,
            "credential_uuid": new.credential_uuid,
            "origin": new.origin,
            "rp_id": new.relying_party_id,
        }

    async def begin(self, request: Request) -> Mapping[str, Any]:
        session = self._json_guard(request)
        origin = _origin(request)
        body = await self._body(request)
        task = await self._current(session, origin)
        stage = stage_of(task, session, origin)
        if body.get("stage") != stage:
            raise Refused(STALE, 409)
        session.pending = None
        provider = await self._provider(task.rotation_id)
        try:
            user, _ = await self._user(provider, task)
            creds = await user.credentials()
            old, new = self._find(creds, task)
            if old is None:
                raise Refused("The passkey this link is for is no longer on your account.", 409)
            if stage == "signin" and new is not None:  # registered in an earlier visit
                await self._record(task, REGISTERED, self._registered(new))
                return {"next": True}
            if stage == "signin":
                # signing in IS the old passkey's last signature: Create Credential Code, so
                # the new passkey is registered with the code (never signed by the old one; a
                # device that replaces the old passkey by the new one locks nobody out)
                challenge = await user.challenge("create_code")
                return self._ask(session, stage, challenge, old)
            if stage == "register":
                if new is not None:
                    await self._record(task, REGISTERED, self._registered(new))
                    return {"next": True}
                creation = await user.registration(origin)
                session.pending = Pending(stage, creation=creation)
                return {"create": creation_options(creation, old.credential_id)}
            if stage == "move":
                if new is not None:
                    await self._record(task, REGISTERED, self._registered(new))
                    return {"next": True}
                challenge = await user.challenge("create_code")
                return self._ask(session, stage, challenge, old)
            if stage == "continue":
                return {"redirect": self._handoff_url(task, session, None)}
            if stage in ("prove", "deactivate"):
                return await self._prove_step(session, task, user, old, new, origin, stage)
            if stage == "rollback":
                return await self._rollback_step(session, task, user, old, new, origin)
            raise Refused(STALE, 409)
        finally:
            await provider.aclose()

    async def _prove_step(
        self,
        session: Session,
        task: LinkTask,
        user: UserPasskeys,
        old: ProviderCredential,
        new: ProviderCredential | None,
        origin: str,
        stage: str,
    ) -> Mapping[str, Any]:
        """One user action, "deactivate the old passkey", signed by the new one: accepted, it
        proves the new passkey; sent (when allowed), it deactivates the old one."""
        if new is None or not new.is_active:
            raise Refused("Your new passkey is not active on your account.", 409)
        if stage == "deactivate" and not old.is_active:
            await self._record(task, OLD_DEACTIVATED, self._deactivated(old, origin))
            return {"next": True}
        challenge = await user.challenge("deactivate", credential_uuid=old.credential_uuid)
        return self._ask(session, stage, challenge, new)

    def _ask(
        self,
        session: Session,
        stage: str,
        challenge: PasskeyChallenge,
        signer: ProviderCredential,
    ) -> Mapping[str, Any]:
        session.pending = Pending(stage, challenge=challenge, expect=signer.credential_id)
        return {"get": request_options(challenge, signer)}

    @staticmethod
    def _deactivated(old: ProviderCredential, origin: str) -> dict[str, Any]:
        return {"credential_uuid": old.credential_uuid, "origin": origin}

    async def _rollback_step(
        self,
        session: Session,
        task: LinkTask,
        user: UserPasskeys,
        old: ProviderCredential,
        new: ProviderCredential | None,
        origin: str,
    ) -> Mapping[str, Any]:
        if not old.is_active:
            if new is None or not new.is_active:
                raise Refused(
                    "Neither passkey is active, so this cannot be undone here; "
                    "ask your administrator.",
                    409,
                )
            challenge = await user.challenge("activate", credential_uuid=old.credential_uuid)
            return self._ask(session, "rollback", challenge, new)
        if new is not None and new.is_active:
            challenge = await user.challenge("deactivate", credential_uuid=new.credential_uuid)
            return self._ask(session, "rollback", challenge, old)
        await self._record(
            task,
            ROLLED_BACK,
            {
                "old_credential_uuid": old.credential_uuid,
                "new_credential_uuid": new.credential_uuid if new else None,
                "origin": origin,
            },
        )
        return {"next": True}

    async def finish(self, request: Request) -> Mapping[str, Any]:
        session = self._json_guard(request)
        origin = _origin(request)
        body = await self._body(request)
        task = await self._current(session, origin)
        pending = session.pending
        if pending is None or body.get("stage") != pending.stage:
            raise Refused(STALE, 409)
        answer = body.get("credential")
        if not isinstance(answer, Mapping):
            raise Refused("The browser's answer is incomplete; try again.", 400)
        session.pending = None
        provider = await self._provider(task.rotation_id)
        try:
            if pending.creation is not None and pending.via_code:
                info = credential_info(answer)
                created = await provider.create_passkey_with_code(
                    pending.creation, info, passkey_name(task.rotation_id)
                )
                self._boundary("registered.after_call")
                await self._record(task, REGISTERED, self._registered(created))
                return {"next": True}
            user, user_id = await self._user(provider, task)
            if pending.creation is not None:
                # the new passkey exists in the browser: Create Credential, signed by the old one
                info = credential_info(answer)
                creds = await user.credentials()
                old, _ = self._find(creds, task)
                if old is None:
                    raise Refused("The passkey this link is for is no longer on your account.")
                challenge = await user.challenge(
                    "create_passkey",
                    creation=pending.creation,
                    credential_info=info,
                    name=passkey_name(task.rotation_id),
                )
                return self._ask(session, pending.stage, challenge, old)
            assert pending.challenge is not None
            cred_id, handle, factor = first_factor(answer)
            check_assertion(cred_id, handle, pending.expect, user_id)
            signed = await user.accept(pending.challenge, factor)
            if (
                stage_of(task, session, origin) == "signin"
                and signed.challenge.call == "create_code"
            ):
                return await self._signed_in(session, task, user, provider, signed, origin)
            return await self._carry_out(session, task, user, signed, origin)
        finally:
            await provider.aclose()

    async def _signed_in(
        self,
        session: Session,
        task: LinkTask,
        user: UserPasskeys,
        provider: PasskeyProvider,
        signed: SignedCall,
        origin: str,
    ) -> Mapping[str, Any]:
        """Signed in with the old passkey, which signed a one-time code (created now, while the
        user is here, and never stored): the new passkey's creation options from it."""
        session.signed_in = True
        _, new = self._find(await user.credentials(), task)
        if new is not None:  # registered in an earlier visit
            await self._record(task, REGISTERED, self._registered(new))
            return {"next": True}
        code = await user.create_code(signed)
        creation = await provider.code_registration(code, origin)
        session.pending = Pending("signin", creation=creation, via_code=True)
        return {"create": creation_options(creation, task.old_credential_id)}

    async def _carry_out(
        self, session: Session, task: LinkTask, user: UserPasskeys, signed: SignedCall, origin: str
    ) -> Mapping[str, Any]:
        """After the provider accepted the user's assertion for the pending step."""
        call = signed.challenge.call
        stage = stage_of(task, session, origin)
        if stage == "signin":
            session.signed_in = True
            return {"next": True}
        if stage == "register" and call == "create_passkey":
            created = await user.create_passkey(signed)
            await self._record(task, REGISTERED, self._registered(created))
            return {"next": True}
        if stage == "move" and call == "create_code":
            code = await user.create_code(signed)
            return {"redirect": self._handoff_url(task, session, code.reveal())}
        if stage in ("prove", "deactivate") and call == "deactivate":
            creds = await user.credentials()
            old, new = self._find(creds, task)
            assert new is not None and old is not None
            self._boundary("proven.after_call")
            await self._record(task, PROVEN, {"credential_id": new.credential_id, "origin": origin})
            if stage == "prove" and not task.may_deactivate:
                return {"next": True}
            if old.is_active:
                await user.send(signed)
                self._boundary("deactivated.after_call")
            await self._record(task, OLD_DEACTIVATED, self._deactivated(old, origin))
            return {"next": True}
        if stage == "rollback" and call in ("activate", "deactivate"):
            await user.send(signed)
            return {"again": True}
        raise Refused(STALE, 409)

    def _handoff_url(self, task: LinkTask, session: Session, code: str | None) -> str:
        assert task.new_origin is not None
        token = secrets.token_urlsafe(32)
        self.handoffs[token] = Handoff(
            rotation_id=task.rotation_id,
            link_hash=session.link_hash,
            task=task.task,
            expires=time.monotonic() + HANDOFF_SECONDS,
        )
        fragment = {"h": token} if code is None else {"h": token, "c": code}
        return f"{task.new_origin}{self.root}/move#{urlencode(fragment)}"

    async def handoff(self, request: Request) -> Mapping[str, Any]:
        """The new origin's page hands in the one-time hand-off token (and the code): a session
        here, and the new passkey's creation options when there is a code."""
        origin = _origin(request)
        if request.headers.get("origin") != origin:
            raise Refused("This request did not come from this page.")
        body = await self._body(request)
        token = body.get("h")
        self._prune()
        handoff = self.handoffs.pop(token, None) if isinstance(token, str) else None
        if handoff is None:
            raise Refused(EXPIRED)
        task = await self.tasks.task(handoff.rotation_id)
        if task.finished:
            raise Refused(FINISHED, 409)
        if not hmac.compare_digest(task.link_hash, handoff.link_hash) or task.task != handoff.task:
            raise Refused("A newer link was sent for this; use the newest one.", 409)
        if origin != task.new_origin:
            raise Refused(WRONG_ORIGIN)
        session = self._new_session(task, origin, handoff.link_hash)
        request.state.opened = session
        result: dict[str, Any] = {"csrf": session.csrf}
        code = body.get("c")
        if isinstance(code, str) and code and REGISTERED not in task.evidence:
            provider = await self._provider(task.rotation_id)
            try:
                user, _ = await self._user(provider, task)
                _, new = self._find(await user.credentials(), task)
                if new is not None:
                    await self._record(task, REGISTERED, self._registered(new))
                else:
                    creation = await provider.code_registration(code, origin)
                    session.pending = Pending("register-code", creation=creation, via_code=True)
                    result["create"] = creation_options(creation, task.old_credential_id)
            finally:
                await provider.aclose()
        log.info("passkey rotation %s: continued on the new origin", task.rotation_id)
        return result

    async def snooze(self, request: Request) -> Mapping[str, Any]:
        session = self._json_guard(request)
        task = await self._current(session, _origin(request))
        if task.task != "enrol" or REGISTERED in task.evidence:
            raise Refused(STALE, 409)
        await self.tasks.record(task.rotation_id, f"{SNOOZED}:{_snoozes(task) + 1}", {})
        session.notice = "We will remind you later. You can close this page."
        return {"next": True}

    def routes_app(self) -> Starlette:
        async def api(request: Request) -> Response:
            return await self.api(request)

        return Starlette(
            routes=[
                Route("/l/{token}", self.open_link, methods=["GET"]),
                Route("/task", self.task_page, methods=["GET"]),
                Route("/move", self.move_page, methods=["GET"]),
                Route("/api/{kind}", api, methods=["POST"]),
                Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
            ]
        )


class HideLinkTokens:
    """ASGI middleware: the app sees ``/l/{token}``; the server's own view of the request (the
    scope dict it logs its access line from) says ``/l/-``, so no access log holds a token."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", "")) if scope["type"] == "http" else ""
        at = path.find("/l/")
        if at >= 0:  # also when mounted under a prefix
            inner = dict(scope)
            scope["path"] = path[:at] + "/l/-"
            scope["raw_path"] = scope["path"].encode()
            scope["query_string"] = b""
            await self.app(inner, receive, send)
            return
        await self.app(scope, receive, send)


def user_app(tasks: PasskeyTasks, *, secure_cookies: bool, root: str = "") -> Starlette:
    """The user pages for passkey rotations (mount on the user listener, its own origin, at
    `root`)."""
    pages = UserPages(tasks, secure_cookies=secure_cookies, root=root)
    app = pages.routes_app()
    app.user_middleware.insert(0, Middleware(HideLinkTokens))
    app.state.pages = pages
    return app
