"""A Dfns-compatible local sandbox with fault injection (for tests, demos and rehearsals).

Run it with ``python -m keyturn.sandbox serve --state-dir DIR``; drive it from tests with
:mod:`keyturn.sandbox.testing`.
"""
