"""The engine's WebhookProvider port on top of DfnsClient (calls signed by the client's signer)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from keyturn.adapters.dfns.client import DfnsClient
from keyturn.adapters.dfns.errors import DfnsApiError
from keyturn.adapters.dfns.models import Webhook
from keyturn.adapters.dfns.signing import KeySigner
from keyturn.ports import RequestBudget, RequestObserver, WebhookInfo, WebhookProvider

PAGE_SIZE = 500
MAX_PAGES_PER_CALL = 20


def _parse_date(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _info(w: Webhook) -> WebhookInfo:
    return WebhookInfo(
        id=w.id, url=w.url, events=tuple(w.events), status=w.status, description=w.description
    )


class DfnsWebhookProvider(WebhookProvider):
    def __init__(self, client: DfnsClient) -> None:
        self._client = client
        self._cursor: dict[str, str] = {}
        self._newest: dict[str, datetime] = {}

    async def get_webhook(self, webhook_id: str) -> WebhookInfo | None:
        try:
            return _info(await self._client.get_webhook(webhook_id))
        except DfnsApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list_webhooks(self) -> list[WebhookInfo]:
        return [_info(w) for w in await self._client.list_webhooks()]

    async def create_webhook(
        self, *, url: str, events: Sequence[str], description: str, enabled: bool
    ) -> tuple[WebhookInfo, str]:
        webhook, secret = await self._client.create_webhook(
            url, list(events), description=description, status="Enabled" if enabled else "Disabled"
        )
        return _info(webhook), secret.reveal()

    async def set_enabled(self, webhook_id: str, enabled: bool) -> None:
        await self._client.update_webhook(webhook_id, status="Enabled" if enabled else "Disabled")

    async def delete_webhook(self, webhook_id: str) -> None:
        try:
            await self._client.delete_webhook(webhook_id)
        except DfnsApiError as exc:
            if exc.status != 404:
                raise

    async def ping(self, webhook_id: str) -> str:
        return (await self._client.ping_webhook(webhook_id)).status

    async def latest_delivery(self, webhook_id: str) -> datetime | None:
        """Pages through the delivery records (whatever their order), remembering where it
        stopped, so that polling a long-lived webhook reads each page once."""
        newest = self._newest.get(webhook_id)
        token = self._cursor.get(webhook_id)
        for _ in range(MAX_PAGES_PER_CALL):
            page = await self._client.list_webhook_events(
                webhook_id, limit=PAGE_SIZE, pagination_token=token
            )
            for event in page.items:
                when = _parse_date(event.date)
                if when is not None and (newest is None or when > newest):
                    newest = when
            if page.next_page_token is None:
                break
            token = page.next_page_token
            self._cursor[webhook_id] = token
        if newest is not None:
            self._newest[webhook_id] = newest
        return newest

    async def aclose(self) -> None:
        await self._client.aclose()


def webhook_provider_for(
    base_url: str,
    token: str,
    signer_credential_id: str,
    signer_private_key_pem: bytes,
    *,
    timeout: float = 10.0,
    fence: Callable[[], None] | None = None,
    budget: RequestBudget | None = None,
    observe: RequestObserver | None = None,
) -> DfnsWebhookProvider:
    signer = KeySigner.from_pem(signer_credential_id, signer_private_key_pem)
    return DfnsWebhookProvider(
        DfnsClient(
            base_url,
            token,
            signer=signer,
            timeout=timeout,
            fence=fence,
            budget=budget,
            observe=observe,
        )
    )
