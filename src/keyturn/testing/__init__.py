"""Testing helpers shipped with keyturn (used by its own tests, usable by yours).

:mod:`keyturn.testing.secret_scan` finds secrets (in their many encodings) in files and bytes.
"""

from keyturn.testing.secret_scan import (
    Finding,
    assert_no_secrets,
    scan_bytes,
    scan_paths,
    variants,
)

__all__ = ["Finding", "assert_no_secrets", "scan_bytes", "scan_paths", "variants"]
