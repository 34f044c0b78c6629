"""The passkey kind: end users rotate their own passkeys, keyturn orchestrates (see .kind)."""

from keyturn.kinds.passkey.kind import PASSKEY

__all__ = ["PASSKEY"]
