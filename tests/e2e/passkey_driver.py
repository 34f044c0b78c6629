"""A user's browser without the browser (imported as `passkey_driver`): the passkey user pages'
own HTTP protocol (the link, /task, /api/begin and /api/finish, as passkey.js speaks it),
with the software authenticator answering navigator.credentials' get and create. For the
tests that need many users or many restarts (a campaign of 200, the kill matrix); the real
browser is in test_passkey_pages.py and test_passkey_journey.py.

Same-domain enrolment only (a domain move's hand-off is the browser tests' part)."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from keyturn.testing.authenticator import SoftwareAuthenticator

#: What a page says it is at when there is nothing left for the user to do there.
RESTING = ("done", "done-for-now")


def _b64u_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageRefused(AssertionError):
    """The pages refused (the status and their sentence)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass
class SoftwareBrowser:
    """One user's browser on the pages' origin (`origin`, reached on 127.0.0.1 with that Host),
    holding `device`'s passkeys."""

    origin: str
    device: SoftwareAuthenticator
    root: str = "/passkey"
    timeout: float = 30.0
    client: httpx.Client = field(init=False)
    csrf: str = ""
    #: The prompts the user answered: passkeys made, signatures given.
    created: int = 0
    signed: int = 0

    def __post_init__(self) -> None:
        parts = urlsplit(self.origin)
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{parts.port}",
            headers={"Host": parts.netloc},
            timeout=self.timeout,
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> SoftwareBrowser:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ pages

    def open(self, link: str) -> str:
        """Open a link (from its message): the stage the task page shows."""
        path = urlsplit(link).path
        r = self.client.get(path)
        if r.status_code != 200:
            raise PageRefused(r.status_code, _sentence(r.text))
        return self.task()

    def task(self) -> str:
        r = self.client.get(f"{self.root}/task")
        if r.status_code != 200:
            raise PageRefused(r.status_code, _sentence(r.text))
        csrf = re.search(r'name="csrf-token" content="([^"]*)"', r.text)
        self.csrf = csrf.group(1) if csrf else ""
        stage = re.search(r'data-stage="([^"]*)"', r.text)
        assert stage is not None, "the task page names no stage"
        return stage.group(1)

    def api(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post(
            f"{self.root}/api/{name}",
            json=body,
            headers={"Origin": self.origin, "X-CSRF-Token": self.csrf},
        )
        data: dict[str, Any] = r.json()
        if r.status_code != 200:
            raise PageRefused(r.status_code, str(data.get("error")))
        return data

    def act(self, stage: str) -> None:
        """Press the page's button for `stage`: what passkey.js does, the prompts answered."""
        reply = self.api("begin", {"stage": stage})
        for _ in range(10):
            if "get" in reply:
                credential = self.assertion(reply["get"])
            elif "create" in reply:
                credential = self.creation(reply["create"])
            elif reply.get("again"):
                reply = self.api("begin", {"stage": stage})
                continue
            else:
                return
            reply = self.api("finish", {"stage": stage, "credential": credential})
        raise AssertionError(f"the {stage} step did not end")

    def run(self, link: str, *, until: tuple[str, ...] = RESTING) -> str:
        """Open `link` and act on each stage until one of `until`; the last stage."""
        stage = self.open(link)
        for _ in range(8):
            if stage in until:
                return stage
            self.act(stage)
            stage = self.task()
        raise AssertionError(f"stuck at {stage}")

    # --------------------------------------------------------- navigator.credentials

    def assertion(self, options: dict[str, Any]) -> dict[str, Any]:
        self.signed += 1
        allowed = [c["id"] for c in options.get("allowCredentials") or []]
        signed = self.device.get_assertion(
            origin=self.origin,
            challenge=_b64u_decode(options["challenge"]).decode(),
            allow_credentials=allowed,
        )
        return {
            "id": signed["credId"],
            "type": "public-key",
            "response": {
                "clientDataJSON": signed["clientData"],
                "authenticatorData": signed["authenticatorData"],
                "signature": signed["signature"],
                "userHandle": signed.get("userHandle"),
            },
        }

    def creation(self, options: dict[str, Any]) -> dict[str, Any]:
        self.created += 1
        made = self.device.make_credential(
            rp_id=options["rp"]["id"],
            origin=self.origin,
            challenge=_b64u_decode(options["challenge"]).decode(),
            user_id=_b64u_decode(options["user"]["id"]).decode(),
            user_name=options["user"].get("name", ""),
        )
        return {
            "id": made["credId"],
            "type": "public-key",
            "response": {
                "clientDataJSON": made["clientData"],
                "attestationObject": made["attestationData"],
            },
        }


def _sentence(html: str) -> str:
    found = re.search(r'data-testid="refused"[^>]*>(.*?)<', html, re.S)
    return found.group(1).strip() if found else html[:200]
