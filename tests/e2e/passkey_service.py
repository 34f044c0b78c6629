"""The passkey kind's service for the end-to-end tests (imported as `passkey_service`): a
sandbox whose users' passkeys live on http://old.localhost:PORT (http://new.localhost:PORT
allowed too), a passkey entry, a mailer-shaped sink that receives the users' links, and
`keyturn serve --worker --user-port PORT` serving the user pages on both host names."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from harness import KEYTURN, SA, Kt
from receivers import Receivers, start_receivers

ENTRY = "staff"
HOOK_KEY = "whk-journey-" + "7e" * 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def until(what: str, check: Callable[[], Any], seconds: float = 30.0) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.1)


@dataclass
class Journey:
    kt: Kt
    mail: Receivers
    old: str
    new: str
    api: str
    token: str
    out: Path
    serve_log: Path
    user_port: int = 0
    proc: subprocess.Popen[str] | None = None

    def start(self, *, wait: bool = True, **env: str) -> None:
        """`keyturn serve --worker --user-port` (its output appended to serve_log); `env`: e.g.
        a crash point (KEYTURN_TEST_CRASH_AT). Without `wait`, :meth:`up` waits later."""
        api_port = self.api.rsplit(":", 1)[1]
        with self.serve_log.open("a") as sink:
            self.proc = subprocess.Popen(
                [*KEYTURN, "serve", "--worker", "--port", api_port,
                 "--user-port", str(self.user_port)],
                env=self.kt.env(**env), stdout=sink, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        if wait:
            self.up()

    def up(self) -> None:
        until("serve", lambda: self.proc is not None and _up(f"{self.api}/healthz"), 30)

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (a clean stop) or, with `kill`, SIGKILL."""
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def killed(self, seconds: float = 60.0) -> int:
        """Wait for serve to die by itself (a crash point); its exit status."""
        assert self.proc is not None
        code = self.proc.wait(timeout=seconds)
        self.proc = None
        return code

    def invitations(self, task: str | None = None) -> list[dict[str, Any]]:
        """What the users' mailer received: user_task notifications (a link each)."""
        docs = [r.json() for r in self.mail.at("/mail")]
        return [
            d
            for d in docs
            if d.get("kind") == "user_task" and task in (None, d.get("detail", {}).get("task"))
        ]

    def link_of(self, username: str, task: str = "enrol") -> str:
        try:
            found = until(
                f"the {task} link of {username}",
                lambda: [d for d in self.invitations(task) if d.get("to") == username],
            )
        except AssertionError:
            got = [{k: r.json().get(k) for k in ("kind", "to", "detail")} for r in self.mail.got]
            raise AssertionError(f"no {task} link for {username}; the mailer got {got}") from None
        link = str(found[-1]["link"])
        assert link.startswith((self.old, self.new)) and "/passkey/l/" in link
        return link

    def rotation(self, username: str) -> dict[str, Any]:
        """The user's latest rotation as `rotations show --json` says it (read in this
        process: tests poll it)."""
        from keyturn.adapters.store.migrate import open_store

        store = open_store(self.kt.database_url)
        try:
            found = store.latest_rotation(f"{ENTRY}:{username}")
        finally:
            store.close()
        assert found is not None, f"{username} has no rotation"
        return self.kt.show_here(found.id)

    def credentials(self, username: str) -> dict[str, dict[str, Any]]:
        token = self.kt.sandbox.delegated_login(username)
        r = httpx.get(
            f"{self.kt.sandbox.base_url}/auth/credentials",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        r.raise_for_status()
        return {c["credentialUuid"]: c for c in r.json()["items"]}

    def campaign(self, name: str, users: list[str], *extra: str) -> str:
        listing = self.out / f"{name}.txt"
        listing.write_text("\n".join(users) + "\n")
        got = self.kt.run(
            "passkeys", "campaign", ENTRY, "--users", str(listing), "--reason", "yearly",
            "--name", name, *extra,
        )  # fmt: skip
        return got.stdout


@contextmanager
def passkey_service(
    make_kt: Callable[..., Kt],
    tmp_path: Path,
    *,
    end_users: int = 3,
    entry: str = "",
    config: str = "",
    check_every: float = 0.3,
    env: dict[str, str] | None = None,
    start: bool = True,
) -> Iterator[Journey]:
    """A sandbox with `end_users` users whose passkeys live on old.localhost (new.localhost
    allowed too), a [credentials.staff] passkey entry (plus `entry`'s lines), a mailer sink,
    and `keyturn serve --worker --user-port` running until the block ends (without `start`,
    not started, and no viewer token made: the test starts serve itself)."""
    port = _free_port()
    old, new = f"http://old.localhost:{port}", f"http://new.localhost:{port}"
    kt = make_kt(
        end_users=end_users,
        extra_args=[
            *("--webauthn-origin", old, "--webauthn-origin", new),
            *("--webauthn-rp-id", "old.localhost", "--webauthn-rp-id", "new.localhost"),
        ],
    )
    mail = start_receivers()
    (kt.workdir / "mail.key").write_text(HOOK_KEY + "\n")
    (kt.workdir / "mail.key").chmod(0o600)
    kt.config.write_text(
        kt.config.read_text()
        + f"""
[credentials.{ENTRY}]
kind = "passkey"
provider = "sandbox"
signer = "{SA}"
origin = "{old}"
check_every_seconds = {check_every}
{entry}

[notifications]
poll_seconds = 0.2

[notifications.sinks.mailer]
type = "http"
url = "{mail.base}/mail"
secret_file = "mail.key"
events = ["user_task", "reminder"]

[serve]
metrics = "open"
{config.replace("{mail}", mail.base)}"""
    )
    j = Journey(kt, mail, old, new, f"http://127.0.0.1:{_free_port()}", "", tmp_path / "journey",
                tmp_path / "serve.log", user_port=port)  # fmt: skip
    j.out.mkdir()
    try:
        if start:
            j.start(**(env or {}))
            j.token = kt.run("tokens", "create", "--role", "viewer", "--name", "j").stdout.strip()
        yield j
    finally:
        j.stop()
        mail.server.shutdown()


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False
