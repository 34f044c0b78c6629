"""The composition root's provider access: what a kind's session factory receives for a managed
credential of a real working directory (`keyturn init` against the sandbox), and the refusals
when the material asked for is not there."""

from __future__ import annotations

import asyncio

import pytest
from harness import SA, WEBHOOK, Kt

from keyturn.cli.wiring import Wiring
from keyturn.config import load_config
from keyturn.domain.errors import KeyturnError
from keyturn.plugin import ProviderAccess, dfns_key_session, dfns_webhook_session


def access(w: Wiring, name: str, *, with_key: bool = False) -> ProviderAccess:
    return asyncio.run(w.provider_session(lambda a: a, name, with_key=with_key))


def test_a_session_factory_gets_the_credentials_provider_token_and_key(kt: Kt) -> None:
    w = Wiring(load_config(kt.config))
    managed = w.store.get_credential(SA)
    plain = access(w, SA)
    assert plain.credential == SA and plain.provider == managed.provider
    assert plain.base_url == w.config.provider(managed.provider).base_url
    assert plain.token and plain.key is None
    keyed = access(w, SA, with_key=True)
    assert keyed.key is not None
    assert keyed.key.credential_id == managed.credential_id
    assert w.keys.algorithm_of(keyed.key.private_key_pem) == managed.algorithm
    shown = repr(keyed)
    assert plain.token not in shown and "PRIVATE KEY" not in shown


def test_the_dfns_sessions_built_from_it_reach_the_sandbox(kt: Kt) -> None:
    w = Wiring(load_config(kt.config))

    async def scenario() -> tuple[int, int]:
        keys = await w.provider_session(dfns_key_session, SA)
        hooks = await w.provider_session(dfns_webhook_session, SA, with_key=True)
        try:
            return len(await keys.list_credentials()), len(await hooks.list_webhooks())
        finally:
            await keys.aclose()
            await hooks.aclose()

    credentials, webhooks = asyncio.run(scenario())
    assert credentials >= 1 and webhooks == 1


def test_a_key_is_refused_for_a_kind_that_does_not_sign_and_a_webhook_session_needs_one(
    kt: Kt,
) -> None:
    w = Wiring(load_config(kt.config))
    with pytest.raises(KeyturnError, match=f"credential {WEBHOOK} is a webhook credential"):
        access(w, WEBHOOK, with_key=True)
    with pytest.raises(KeyturnError, match="open it with provider_session"):
        dfns_webhook_session(access(w, SA))
