"""Credential kinds: each declares its steps, their actions and compensations.

Adding a kind means adding a module here and one entry in :data:`KINDS`; no other kind changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from keyturn.domain.lifecycle import Trigger
from keyturn.domain.model import ActionRecord, CredentialKind, ManagedCredential, Phase, Rotation
from keyturn.engine.run import RotationRun


class RotationKind(Protocol):
    kind: CredentialKind
    #: The external actions each step performs, in order. Crash tests generate kill points
    #: from this declaration, so it must match what the step does.
    steps: Mapping[Trigger, Sequence[tuple[Phase, str]]]

    def initial_data(
        self, credential: ManagedCredential, options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The rotation's starting context (no secrets), recorded when it is created."""

    async def run_step(self, run: RotationRun, trigger: Trigger) -> None:
        """Perform the step's actions (intent before effect) and fire `trigger`."""

    def irreversible_reason(
        self, rotation: Rotation, actions: Sequence[ActionRecord]
    ) -> str | None:
        """Why rollback is no longer possible, or None."""


def kind_for(kind: CredentialKind | str) -> RotationKind:
    from keyturn.engine.kinds.signing_key import SERVICE_ACCOUNT

    kinds: dict[CredentialKind, RotationKind] = {CredentialKind.SERVICE_ACCOUNT: SERVICE_ACCOUNT}
    try:
        return kinds[CredentialKind(kind)]
    except (KeyError, ValueError):
        supported = ", ".join(sorted(k.value for k in kinds))
        from keyturn.domain.errors import KeyturnError

        raise KeyturnError(
            f"credential kind {kind} cannot be rotated yet; supported kinds: {supported}"
        ) from None
