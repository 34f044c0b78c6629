"""Credential kinds: each declares its steps, their actions and compensations, and which of
its actions make the rotation irreversible.

Adding a kind means adding a module here and one entry in :func:`kinds`; no other kind changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, Protocol

from keyturn.domain.errors import KeyturnError
from keyturn.domain.lifecycle import Trigger
from keyturn.domain.model import ActionRecord, CredentialKind, ManagedCredential, Phase, Rotation
from keyturn.engine.kinds.base import irreversible_reason
from keyturn.engine.run import RotationRun

__all__ = ["RotationKind", "irreversible_reason", "kind_for", "kinds"]


class RotationKind(Protocol):
    kind: CredentialKind
    #: The external actions each step performs, in order. Crash tests generate kill points
    #: from this declaration, so it must match what the step does.
    steps: Mapping[Trigger, Sequence[tuple[Phase, str]]]
    #: Once the intent of one of these actions is recorded, rollback is refused.
    irreversible_actions: frozenset[tuple[Phase, str]]

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


@cache
def kinds() -> dict[CredentialKind, RotationKind]:
    from keyturn.engine.kinds.signing_key import PAT, SERVICE_ACCOUNT
    from keyturn.engine.kinds.webhook import WEBHOOK

    return {k.kind: k for k in (SERVICE_ACCOUNT, PAT, WEBHOOK)}


def kind_for(kind: CredentialKind | str) -> RotationKind:
    registry = kinds()
    try:
        return registry[CredentialKind(kind)]
    except (KeyError, ValueError):
        supported = ", ".join(sorted(k.value for k in registry))
        raise KeyturnError(
            f"credential kind {kind} cannot be rotated yet; supported kinds: {supported}"
        ) from None
