"""The passkey kind: end users rotate their own passkeys, keyturn orchestrates (see .kind).

The kind is loaded on first use (``keyturn --help`` imports this package for its commands)."""

from __future__ import annotations

from typing import Any

__all__ = ["PASSKEY"]


def __getattr__(name: str) -> Any:
    if name == "PASSKEY":
        from keyturn.kinds.passkey.kind import PASSKEY

        return PASSKEY
    raise AttributeError(name)
