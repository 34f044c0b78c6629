"""The ``receiver`` probe: a keyturn-compatible webhook receiver reports the secrets version it
has loaded (GET {url}/_receiver/state)."""

from __future__ import annotations

from keyturn.adapters.secrets_file import ReceiverStateProbe
from keyturn.plugin import ProbeConfig, Services


class ReceiverConfig(ProbeConfig):
    url: str


class ReceiverPlugin:
    type = "receiver"
    description = "a keyturn-compatible receiver reporting the secrets version it has loaded"
    config_model = ReceiverConfig
    accepts = frozenset({"secret_set"})

    def build(self, config: ProbeConfig, services: Services) -> ReceiverStateProbe:
        assert isinstance(config, ReceiverConfig)
        return ReceiverStateProbe(config.name or f"receiver:{config.url}", config.url)


RECEIVER = ReceiverPlugin()
