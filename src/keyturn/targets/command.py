"""The ``command`` deploy target: a program of the user's (a script around kubectl, a vault
CLI, a config-management tool) that receives signing-key material as a JSON document on its
stdin, one call per phase of the target cycle (stage, read_back, promote, rollback). See
:mod:`keyturn.adapters.command` for the protocol.

    [[credentials.api.targets]]
    type = "command"
    name = "api-pods"
    command = ["/usr/local/bin/deploy-key", "--namespace", "api"]
    timeout_seconds = 30
    reload_command = ["kubectl", "rollout", "restart", "deployment/api", "-n", "api"]
"""

from __future__ import annotations

import builtins
from typing import Annotated

from pydantic import Field, StringConstraints

from keyturn.adapters.command import DEFAULT_TIMEOUT_SECONDS, CommandProgram
from keyturn.plugin import DeployedMaterial, Detail, Services, TargetConfig, TargetOp

Arg = Annotated[str, StringConstraints(min_length=1)]


class CommandConfig(TargetConfig):
    #: The program and its arguments (no shell; never secrets: argv is visible to every user).
    command: list[Arg] = Field(min_length=1)
    timeout_seconds: float = Field(default=DEFAULT_TIMEOUT_SECONDS, gt=0, le=3600)
    #: Run after a promote or rollback that changed something (e.g. systemctl reload app).
    reload_command: list[Arg] | None = Field(default=None, min_length=1)


class CommandTarget:
    """The KeyTarget of a ``command`` target (every call runs the program once)."""

    def __init__(self, program: CommandProgram) -> None:
        self._program = program
        self.name = program.name

    def __repr__(self) -> str:
        return f"CommandTarget({self._program!r})"

    async def _write(self, phase: str, material: DeployedMaterial, op: TargetOp) -> Detail:
        return await self._program.write(
            phase, material, rotation_id=op.rotation_id, credential=op.credential
        )

    async def stage(self, material: DeployedMaterial, op: TargetOp) -> Detail:
        return await self._write("stage", material, op)

    async def read_back(self, *, staged: bool = False) -> DeployedMaterial:
        return await self._program.read_back(staged=staged)

    async def promote(self, material: DeployedMaterial, op: TargetOp) -> Detail:
        return await self._write("promote", material, op)

    async def rollback(self, previous: DeployedMaterial, op: TargetOp) -> Detail:
        return await self._write("rollback", previous, op)


class CommandPlugin:
    type = "command"
    description = "a program receiving the signing key as JSON on stdin (stage/promote/...)"
    config_model: builtins.type[TargetConfig] = CommandConfig
    accepts = frozenset({"signing_key"})

    def build(self, config: TargetConfig, services: Services) -> CommandTarget:
        assert isinstance(config, CommandConfig)
        name = config.name or f"command:{config.command[0]}"
        return CommandTarget(
            CommandProgram(
                name,
                config.command,
                timeout_seconds=config.timeout_seconds,
                reload_command=config.reload_command,
            )
        )


COMMAND = CommandPlugin()
