"""Notification sinks over HTTP (httpx): a generic JSON webhook signed with HMAC-SHA256, a
Slack incoming webhook, Prometheus Alertmanager (``POST /api/v2/alerts``) and PagerDuty Events
v2. Each implements :class:`keyturn.ports.Sink`.

Secrets (the HMAC key, the Slack URL, the PagerDuty routing key) come from an environment
variable or a file of mode 0600 (:func:`read_secret`), are held by the sink only, and are
replaced by ``[redacted]`` in every error it reports (:meth:`HttpSink.redact`); an error never
carries a request URL or body.

The webhook's signature: header ``Keyturn-Signature: t=<unix seconds>,v1=<hex>`` where hex is
HMAC-SHA256(key, ``<t>.`` + the raw request body). A receiver recomputes it over the bytes it
received, compares in constant time, and refuses a ``t`` too far from its clock (replays).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from keyturn.domain.errors import ConfigError
from keyturn.ports import SendResult

REDACTED = "[redacted]"
SIGNATURE_HEADER = "Keyturn-Signature"
NOTIFICATION_ID_HEADER = "Keyturn-Notification-Id"
USER_AGENT = "keyturn-notifications/1"
PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
ALERT_NAME = "KeyturnRotationNeedsAttention"

_SLACK_EMOJI = {
    "halted": ":rotating_light:",
    "holder_lost": ":warning:",
    "awaiting_approval": ":raised_hand:",
    "waiting": ":hourglass_flowing_sand:",
    "completed": ":white_check_mark:",
    "rolled_back": ":leftwards_arrow_with_hook:",
    "cancelled": ":no_entry_sign:",
    "user_task": ":bust_in_silhouette:",
    "reminder": ":alarm_clock:",
    "escalated": ":loudspeaker:",
}
_PD_SEVERITY = {
    "halted": "critical",
    "holder_lost": "error",
    "awaiting_approval": "warning",
    "waiting": "info",
}


def read_secret(env: str | None, file: Path | None, setting: str) -> str:
    """A sink secret from the environment variable `env` or from `file` (a regular file with
    no permission bits for group or others); `setting` names the config key, for errors."""
    if env:
        value = os.environ.get(env, "").strip()
        if not value:
            raise ConfigError(
                f"{setting}: environment variable {env} is empty or unset; export the secret "
                "there, or name a 0600 file instead"
            )
        return value
    if file is None:
        raise ConfigError(f"{setting}: no secret configured; set its _env or _file key")
    try:
        st = file.stat()
    except OSError as exc:
        raise ConfigError(
            f"{setting}: file {file} cannot be read ({exc.strerror}); fix the path"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{setting}: {file} is not a regular file; point it at a file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{setting}: file {file} has mode {mode:04o}, readable by others; run chmod 600 {file}"
        )
    try:
        value = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"{setting}: file {file} cannot be read as UTF-8 text; fix it") from None
    if not value:
        raise ConfigError(f"{setting}: file {file} is empty; write the secret in it")
    return value


def _url_secrets(url: str) -> list[str]:
    """The parts of a URL that must not be shown: the password of its user info, if any."""
    parts = urlsplit(url)
    return [p for p in (parts.password,) if p]


def sign(key: str, body: bytes, at: int) -> str:
    """The ``Keyturn-Signature`` header's value for `body` sent at unix time `at`."""
    mac = hmac.new(key.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


def verify(key: str, body: bytes, header: str, *, now: float, tolerance: float = 300) -> bool:
    """A receiver's check of a ``Keyturn-Signature`` header (see the module's docstring)."""
    fields = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        at = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - at) > tolerance:
        return False
    expected = sign(key, body, at).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


class HttpSink:
    """What every sink shares: one httpx client with the sink's timeout, classification of a
    response or a network error into a :class:`SendResult`, and redaction of its secrets."""

    type = "http"
    pages = False
    resend_seconds: float | None = None

    def __init__(
        self,
        name: str,
        events: Iterable[str],
        *,
        timeout: float = 10.0,
        secrets: Iterable[str] = (),
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.events = frozenset(events)
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._client = httpx.AsyncClient(
            timeout=timeout,
            transport=transport,
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
        )

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _post(
        self, url: str, *, content: bytes, headers: Mapping[str, str] | None = None
    ) -> SendResult:
        try:
            response = await self._client.post(
                url,
                content=content,
                headers={"Content-Type": "application/json", **(headers or {})},
            )
        except httpx.TimeoutException as exc:
            return SendResult(False, error=f"timed out ({type(exc).__name__})", retryable=True)
        except httpx.HTTPError as exc:
            # the exception's text may name the URL: redact it, and keep its first line
            text = self.redact(str(exc).splitlines()[0] if str(exc) else "")
            return SendResult(
                False, error=f"{type(exc).__name__}: {text}".rstrip(": "), retryable=True
            )
        code = response.status_code
        if 200 <= code < 300:
            return SendResult(True, status_code=code)
        body = " ".join(response.text.split())[:200]
        error = f"HTTP {code}" + (f": {self.redact(body)}" if body else "")
        return SendResult(
            False,
            status_code=code,
            error=error,
            retryable=code in (408, 425, 429) or code >= 500,
            retry_after=_retry_after(response.headers.get("Retry-After")),
        )


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _json(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


class WebhookSink(HttpSink):
    """POSTs the notification as JSON, signed with HMAC-SHA256 (``Keyturn-Signature``), with
    ``Keyturn-Notification-Id`` (the same on every retry: a receiver dedupes on it)."""

    type = "http"

    def __init__(self, name: str, events: Iterable[str], *, url: str, key: str, **kw: Any) -> None:
        super().__init__(name, events, secrets=[key, *_url_secrets(url)], **kw)
        self.url = url
        self._key = key

    async def send(self, notification: dict[str, Any], *, resend: bool = False) -> SendResult:
        body = _json({"type": "keyturn.notification", **notification})
        headers = {
            SIGNATURE_HEADER: sign(self._key, body, int(time.time())),
            NOTIFICATION_ID_HEADER: str(notification.get("id")),
        }
        return await self._post(self.url, content=body, headers=headers)


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class SlackSink(HttpSink):
    """A Slack incoming webhook: one message per notification (its URL is the secret)."""

    type = "slack"

    def __init__(self, name: str, events: Iterable[str], *, url: str, **kw: Any) -> None:
        path = urlsplit(url).path
        super().__init__(name, events, secrets=[url, path if len(path) > 8 else ""], **kw)
        self._url = url

    @staticmethod
    def message(notification: Mapping[str, Any]) -> dict[str, Any]:
        kind = str(notification.get("kind"))
        emoji = _SLACK_EMOJI.get(kind, ":bell:")
        text = f"{emoji} *{kind}*: {_slack_escape(str(notification.get('summary', '')))}"
        return {"text": text, "mrkdwn": True}

    async def send(self, notification: dict[str, Any], *, resend: bool = False) -> SendResult:
        return await self._post(self._url, content=_json(self.message(notification)))


class AlertmanagerSink(HttpSink):
    """Prometheus Alertmanager's ``POST /api/v2/alerts``: one alert per rotation (labels
    alertname, rotation, credential, credential_kind and the configured ones), without endsAt
    while it fires, so it is re-sent every `resend_seconds` (Alertmanager resolves an alert not
    re-sent within its resolve_timeout); resolved with endsAt when the rotation ends."""

    type = "alertmanager"
    pages = True

    def __init__(
        self,
        name: str,
        events: Iterable[str],
        *,
        url: str,
        resend_seconds: float = 60.0,
        labels: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(name, events, secrets=_url_secrets(url), **kw)
        self._endpoint = url.rstrip("/") + "/api/v2/alerts"
        self.resend_seconds = resend_seconds
        self.labels = dict(labels or {})

    def alert(self, notification: Mapping[str, Any]) -> dict[str, Any]:
        labels = {
            **self.labels,
            "alertname": ALERT_NAME,
            "rotation": str(notification.get("rotation_id")),
            "credential": str(notification.get("credential")),
            "credential_kind": str(notification.get("credential_kind")),
        }
        alert: dict[str, Any] = {
            "labels": labels,
            "annotations": {
                "summary": str(notification.get("summary", "")),
                "description": str(notification.get("reason") or ""),
                "kind": str(notification.get("kind")),
                "state": str(notification.get("state")),
            },
        }
        at = str(notification.get("at") or datetime.now(UTC).isoformat())
        alert["startsAt"] = at
        if notification.get("resolves"):
            alert["endsAt"] = at
        return alert

    async def send(self, notification: dict[str, Any], *, resend: bool = False) -> SendResult:
        return await self._post(self._endpoint, content=_json([self.alert(notification)]))


class PagerDutySink(HttpSink):
    """PagerDuty Events v2: ``trigger`` for an opening notification, ``resolve`` for the end,
    one ``dedup_key`` per rotation (``keyturn-<rotation id>``), so its incident is one."""

    type = "pagerduty"
    pages = True

    def __init__(
        self,
        name: str,
        events: Iterable[str],
        *,
        routing_key: str,
        events_url: str = PAGERDUTY_EVENTS_URL,
        **kw: Any,
    ) -> None:
        super().__init__(name, events, secrets=[routing_key, *_url_secrets(events_url)], **kw)
        self._key = routing_key
        self._url = events_url

    @staticmethod
    def dedup_key(notification: Mapping[str, Any]) -> str:
        return f"keyturn-{notification.get('rotation_id')}"

    def event(self, notification: Mapping[str, Any]) -> dict[str, Any]:
        base = {"routing_key": self._key, "dedup_key": self.dedup_key(notification)}
        if notification.get("resolves"):
            return {**base, "event_action": "resolve"}
        kind = str(notification.get("kind"))
        return {
            **base,
            "event_action": "trigger",
            "payload": {
                "summary": str(notification.get("summary", ""))[:1024],
                "source": "keyturn",
                "severity": _PD_SEVERITY.get(kind, "error"),
                "component": str(notification.get("credential")),
                "group": str(notification.get("credential_kind")),
                "class": kind,
                "timestamp": notification.get("at"),
                "custom_details": {
                    "rotation_id": notification.get("rotation_id"),
                    "state": notification.get("state"),
                    "reason": notification.get("reason"),
                    "notification_id": notification.get("id"),
                },
            },
        }

    async def send(self, notification: dict[str, Any], *, resend: bool = False) -> SendResult:
        return await self._post(self._url, content=_json(self.event(notification)))
