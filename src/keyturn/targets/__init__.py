"""The built-in deploy targets and probes, registered as plugins like any other (see
:mod:`keyturn.plugin`)."""
