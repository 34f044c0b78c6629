"""The ``receiver`` probe: a keyturn-compatible webhook receiver reports the secrets version it
has loaded (GET {url}/_receiver/state)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from keyturn.plugin import ProbeConfig, Services

if TYPE_CHECKING:  # the adapter (httpx) loads when a probe is built
    from keyturn.adapters.secrets_file import ReceiverStateProbe


class ReceiverConfig(ProbeConfig):
    url: str


class ReceiverPlugin:
    type = "receiver"
    description = "a keyturn-compatible receiver reporting the secrets version it has loaded"
    config_model = ReceiverConfig
    accepts = frozenset({"secret_set"})

    def build(self, config: ProbeConfig, services: Services) -> ReceiverStateProbe:
        from keyturn.adapters.secrets_file import ReceiverStateProbe

        assert isinstance(config, ReceiverConfig)
        return ReceiverStateProbe(config.name or f"receiver:{config.url}", config.url)


RECEIVER = ReceiverPlugin()
