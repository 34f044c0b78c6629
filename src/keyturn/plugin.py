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

A kind reaches the provider through ``services.provider_session(factory, credential)``: keyturn
resolves the credential's provider, token and (``with_key=True``) current signing key into a
:class:`ProviderAccess`, and the factory turns that into a session; :func:`dfns_key_session` and
:func:`dfns_webhook_session` and :func:`dfns_passkey_session` (end users' passkeys, by
delegation) are the Dfns ones.
"""

from __future__ import annotations

from keyturn.domain.errors import ConfigError, KeyturnError, ProviderError, StepError
from keyturn.domain.lifecycle import State, Trigger
from keyturn.domain.model import ActionRecord, ActionStatus, ManagedCredential, Phase, Rotation
from keyturn.domain.reminders import Reminders
from keyturn.engine.spi import (
    KIND_GROUP,
    MEMBER_SEP,
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
    KeyProbe,
    KeyTarget,
    Kind,
    KindPlugin,
    Operations,
    Outcome,
    PluginModel,
    ProbeConfig,
    ProbePlugin,
    ProviderAccess,
    ReconcileInput,
    RotationData,
    Services,
    Step,
    TargetConfig,
    TargetOp,
    TargetPlugin,
    Wait,
    user_task,
)
from keyturn.engine.steps import StepContext
from keyturn.ports import (
    DeployedMaterial,
    Fence,
    KeyProvider,
    OneTimeCode,
    PasskeyCall,
    PasskeyChallenge,
    PasskeyCreation,
    PasskeyProvider,
    ProviderCredential,
    SignedCall,
    SigningKey,
    UserPasskeys,
    WebhookInfo,
    WebhookProvider,
)

F = Phase.FORWARD
R = Phase.ROLLBACK

__all__ = [
    "KIND_GROUP",
    "MEMBER_SEP",
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
    "KeyProbe",
    "KeyProvider",
    "KeyTarget",
    "KeyturnError",
    "Kind",
    "KindPlugin",
    "ManagedCredential",
    "OneTimeCode",
    "Operations",
    "Outcome",
    "PasskeyCall",
    "PasskeyChallenge",
    "PasskeyCreation",
    "PasskeyProvider",
    "Phase",
    "PluginModel",
    "ProbeConfig",
    "ProbePlugin",
    "ProviderAccess",
    "ProviderCredential",
    "ProviderError",
    "R",
    "ReconcileInput",
    "Reminders",
    "Rotation",
    "RotationData",
    "Services",
    "SignedCall",
    "SigningKey",
    "State",
    "Step",
    "StepContext",
    "StepError",
    "TargetConfig",
    "TargetOp",
    "TargetPlugin",
    "Trigger",
    "UserPasskeys",
    "Wait",
    "WebhookInfo",
    "WebhookProvider",
    "dfns_key_session",
    "dfns_passkey_session",
    "dfns_webhook_session",
    "operations",
    "user_task",
]


def dfns_key_session(access: ProviderAccess) -> KeyProvider:
    """A Dfns session as `access`'s credential for its signing credentials (register, list,
    activate, deactivate); the key that signs a write comes with each call."""
    from keyturn.adapters.dfns.provider import provider_for

    return provider_for(
        access.base_url,
        access.token,
        timeout=access.timeout_seconds,
        fence=access.fence,
        budget=access.budget,
        observe=access.observe,
    )


def dfns_webhook_session(access: ProviderAccess) -> WebhookProvider:
    """A Dfns session for webhooks whose writes `access`'s credential signs with its current
    key (ask for the access with ``with_key=True``)."""
    from keyturn.adapters.dfns.webhook_provider import webhook_provider_for

    if access.key is None:
        raise KeyturnError(
            f"credential {access.credential}: a webhook session signs its writes with the "
            "credential's current key; open it with provider_session(..., with_key=True)"
        )
    return webhook_provider_for(
        access.base_url,
        access.token,
        access.key.credential_id,
        access.key.private_key_pem,
        timeout=access.timeout_seconds,
        fence=access.fence,
        budget=access.budget,
        observe=access.observe,
    )


def dfns_passkey_session(access: ProviderAccess) -> PasskeyProvider:
    """A Dfns session for end users' passkeys: `access` is the signing service account's,
    with its current key (Delegated Login is signed by it; ask with ``with_key=True``). The
    users' own writes are signed by their passkeys in their browsers."""
    from keyturn.adapters.dfns.passkey_provider import passkey_provider_for

    if access.key is None:
        raise KeyturnError(
            f"credential {access.credential}: a passkey session logs users in by delegation, "
            "signed with the credential's current key; open it with "
            "provider_session(..., with_key=True)"
        )
    return passkey_provider_for(
        access.base_url,
        access.token,
        access.key.credential_id,
        access.key.private_key_pem,
        timeout=access.timeout_seconds,
        fence=access.fence,
        budget=access.budget,
        observe=access.observe,
    )


def operations() -> Operations:
    """keyturn's operations for a plugin's command (``keyturn.commands`` entry points): the
    configuration, store and provider access of the command being run (``--config``)."""
    from keyturn.cli import state

    return state.wiring()
