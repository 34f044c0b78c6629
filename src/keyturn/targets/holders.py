"""Probes of signing-key holders: which key a holder signs with now, as its fingerprint.

[[credentials.api.probes]]
type = "http"
url = "http://api.internal:8080/.well-known/keyturn-holder"   # keyturn.holders' route

[[credentials.api.probes]]
type = "command"
command = ["kubectl", "exec", "deploy/api", "--", "api-ctl", "key-fingerprint"]
"""

from __future__ import annotations

import builtins
from typing import Annotated

from pydantic import Field, StringConstraints

from keyturn.adapters.holder_probe import (
    DEFAULT_COMMAND_TIMEOUT,
    DEFAULT_HTTP_TIMEOUT,
    CommandHolderProbe,
    HttpHolderProbe,
)
from keyturn.plugin import ProbeConfig, Services

Arg = Annotated[str, StringConstraints(min_length=1)]


class HttpProbeConfig(ProbeConfig):
    url: Annotated[str, StringConstraints(pattern=r"^https?://\S+$")]
    timeout_seconds: float = Field(default=DEFAULT_HTTP_TIMEOUT, gt=0, le=300)
    #: The JSON field holding the fingerprint.
    field: Annotated[str, StringConstraints(min_length=1)] = "fingerprint"


class CommandProbeConfig(ProbeConfig):
    command: list[Arg] = Field(min_length=1)
    timeout_seconds: float = Field(default=DEFAULT_COMMAND_TIMEOUT, gt=0, le=300)


class HttpProbePlugin:
    type = "http"
    description = "GET a holder's JSON status (keyturn.holders' route) for its key fingerprint"
    config_model: builtins.type[ProbeConfig] = HttpProbeConfig
    accepts = frozenset({"signing_key"})

    def build(self, config: ProbeConfig, services: Services) -> HttpHolderProbe:
        assert isinstance(config, HttpProbeConfig)
        return HttpHolderProbe(
            config.name or f"http:{config.url}",
            config.url,
            timeout_seconds=config.timeout_seconds,
            field=config.field,
        )


class CommandProbePlugin:
    type = "command"
    description = "a program printing the fingerprint of the key the holder uses"
    config_model: builtins.type[ProbeConfig] = CommandProbeConfig
    accepts = frozenset({"signing_key"})

    def build(self, config: ProbeConfig, services: Services) -> CommandHolderProbe:
        assert isinstance(config, CommandProbeConfig)
        return CommandHolderProbe(
            config.name or f"command:{config.command[0]}",
            config.command,
            timeout_seconds=config.timeout_seconds,
        )


HTTP = HttpProbePlugin()
COMMAND_PROBE = CommandProbePlugin()
