"""The public API for keyturn plugins: credential kinds, deploy targets and probes.

This is the only keyturn module a plugin imports (an import-linter contract checks it for the
built-in plugins and for the toy plugin under ``tests/plugins``). A plugin registers under an
entry-point group of its distribution::

    [project.entry-points."keyturn.kinds"]
    toy = "keyturn_toy:TOY"          # an object with name = "toy"

    [project.entry-points."keyturn.targets"]
    toy_file = "keyturn_toy:TOY_FILE"  # an object with type = "toy_file"

A kind subclasses :class:`Kind`: its configuration model (extends :class:`CredentialConfig`),
its typed rotation data (extends :class:`RotationData`), and its steps, declared as
:class:`Step` lists of :class:`Action` and :class:`Wait`. ``keyturn plugins`` lists what is
installed.
"""

from __future__ import annotations

from keyturn.domain.errors import ConfigError, KeyturnError, ProviderError, StepError
from keyturn.domain.lifecycle import State, Trigger
from keyturn.domain.model import ActionRecord, ActionStatus, ManagedCredential, Phase, Rotation
from keyturn.engine.spi import (
    KIND_GROUP,
    PROBE_GROUP,
    TARGET_GROUP,
    Action,
    Call,
    CredentialConfig,
    Detail,
    Facts,
    Finding,
    Finish,
    ImportSpec,
    Kind,
    KindPlugin,
    Outcome,
    PluginModel,
    ProbeConfig,
    ProbePlugin,
    ReconcileInput,
    RotationData,
    Services,
    Step,
    TargetConfig,
    TargetPlugin,
    Wait,
)
from keyturn.engine.steps import StepContext
from keyturn.ports import (
    DeployedMaterial,
    Fence,
    KeyProvider,
    ProviderCredential,
    SigningKey,
    WebhookInfo,
    WebhookProvider,
)

F = Phase.FORWARD
R = Phase.ROLLBACK

__all__ = [
    "KIND_GROUP",
    "PROBE_GROUP",
    "TARGET_GROUP",
    "Action",
    "ActionRecord",
    "ActionStatus",
    "Call",
    "ConfigError",
    "CredentialConfig",
    "DeployedMaterial",
    "Detail",
    "F",
    "Facts",
    "Fence",
    "Finding",
    "Finish",
    "ImportSpec",
    "KeyProvider",
    "KeyturnError",
    "Kind",
    "KindPlugin",
    "ManagedCredential",
    "Outcome",
    "Phase",
    "PluginModel",
    "ProbeConfig",
    "ProbePlugin",
    "ProviderCredential",
    "ProviderError",
    "R",
    "ReconcileInput",
    "Rotation",
    "RotationData",
    "Services",
    "SigningKey",
    "State",
    "Step",
    "StepContext",
    "StepError",
    "TargetConfig",
    "TargetPlugin",
    "Trigger",
    "Wait",
    "WebhookInfo",
    "WebhookProvider",
]
