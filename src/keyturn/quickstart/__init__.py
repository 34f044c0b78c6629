"""The sandbox quickstart: `keyturn init` (a working directory wired to a local sandbox's
service account, PAT and webhook) and `keyturn demo` (all three rotated end to end). It is an
application of the built-in kinds, so unlike the generic CLI it names them."""
