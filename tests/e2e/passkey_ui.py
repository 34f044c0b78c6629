"""Page objects of the passkey user pages (imported by test_passkey_pages.py as `passkey_ui`),
and the browser's own virtual authenticator (the DevTools Protocol's WebAuthn domain).
Web-first waits only (expect retries); nothing here sleeps."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from playwright.sync_api import BrowserContext, CDPSession, Locator, Page, expect

#: The old passkey goes in as a discoverable credential, as a platform authenticator keeps a
#: passkey: the new passkey the page makes on this same authenticator replaces it (same rpId
#: and user handle), which the pages' order (the old one signs the code first) survives. A
#: test that needs the old passkey afterwards (a rollback signs with it) imports it as
#: non-discoverable: as if the new passkey were made on another device.
RESIDENT = True


def _b64url_to_b64(text: str) -> str:
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return base64.b64encode(raw).decode("ascii")


@dataclass
class VirtualAuthenticator:
    """A platform authenticator in the browser (ctap2, internal, resident keys, user
    verification, presence simulated) that the pages' navigator.credentials calls reach."""

    cdp: CDPSession
    id: str

    @classmethod
    def attach(cls, context: BrowserContext, page: Page) -> VirtualAuthenticator:
        cdp = context.new_cdp_session(page)
        cdp.send("WebAuthn.enable", {"enableUI": False})
        result = cdp.send(
            "WebAuthn.addVirtualAuthenticator",
            {
                "options": {
                    "protocol": "ctap2",
                    "transport": "internal",
                    "hasResidentKey": True,
                    "hasUserVerification": True,
                    "isUserVerified": True,
                    "automaticPresenceSimulation": True,
                }
            },
        )
        return cls(cdp, str(result["authenticatorId"]))

    def import_passkey(
        self, state_file: Path, credential_id: str, *, resident: bool = RESIDENT
    ) -> None:
        """Copy one passkey (private key included) from the software authenticator's state
        file: the user's old passkey, as if it had been on this device all along."""
        import json

        document = json.loads(state_file.read_text())
        entry = next(p for p in document["passkeys"] if p["credential_id"] == credential_id)
        key = serialization.load_pem_private_key(entry["private_key_pem"].encode(), None)
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.cdp.send(
            "WebAuthn.addCredential",
            {
                "authenticatorId": self.id,
                "credential": {
                    "credentialId": _b64url_to_b64(entry["credential_id"]),
                    "isResidentCredential": resident,
                    "rpId": entry["rp_id"],
                    "privateKey": base64.b64encode(der).decode("ascii"),
                    "userHandle": base64.b64encode(entry["user_id"].encode()).decode("ascii"),
                    "signCount": int(entry["counter"]),
                },
            },
        )

    def credentials(self) -> list[dict[str, Any]]:
        result = self.cdp.send("WebAuthn.getCredentials", {"authenticatorId": self.id})
        return list(result["credentials"])


@dataclass
class PasskeyPage:
    """The task page (/task) and the new origin's page (/move)."""

    page: Page

    @property
    def heading(self) -> Locator:
        return self.page.get_by_role("heading", level=1)

    @property
    def lead(self) -> Locator:
        return self.page.get_by_test_id("lead")

    @property
    def error(self) -> Locator:
        return self.page.get_by_test_id("error")

    @property
    def refused(self) -> Locator:
        return self.page.get_by_test_id("refused")

    @property
    def notice(self) -> Locator:
        return self.page.get_by_test_id("notice")

    def open_link(self, base: str, token: str) -> PasskeyPage:
        """Open a link; it lands on /task (no token left in the address)."""
        self.page.goto(f"{base}/l/{token}")
        expect(self.page).to_have_url(re.compile(r"/task$"))
        return self

    def open_refused_link(self, base: str, token: str) -> PasskeyPage:
        self.page.goto(f"{base}/l/{token}")
        expect(self.refused).to_be_visible()
        return self

    def at(self, stage: str) -> PasskeyPage:
        try:
            expect(self.page.locator("body")).to_have_attribute("data-stage", stage)
        except AssertionError as exc:
            shown = self.error.all_inner_texts() if self.error.count() else []
            raise AssertionError(f"not at {stage!r}; the page says {shown}") from exc
        return self

    def on_move_page(self) -> PasskeyPage:
        expect(self.page).to_have_url(re.compile(r"/move$"))
        return self

    def act(self, name: str) -> PasskeyPage:
        button = self.page.get_by_role("button", name=name)
        expect(button).to_be_enabled()
        button.click()
        return self

    def snooze(self) -> PasskeyPage:
        return self.act("Remind me later")

    def csrf(self) -> str:
        return str(
            self.page.evaluate("() => document.querySelector('meta[name=\"csrf-token\"]').content")
        )

    def post(self, path: str, body: dict[str, Any], csrf: str | None = None) -> dict[str, Any]:
        """A request from the page's own origin, as its script would send it (for forgeries:
        a hand-made assertion, a stale session)."""
        result = self.page.evaluate(
            """async ([path, body, csrf]) => {
                const r = await fetch(path, {method: "POST", credentials: "same-origin",
                    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
                    body: JSON.stringify(body)});
                return {status: r.status, body: await r.json()};
            }""",
            [path, body, csrf if csrf is not None else self.csrf()],
        )
        return dict(result)
