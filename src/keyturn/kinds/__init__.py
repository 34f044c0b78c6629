"""The built-in credential kinds, registered as plugins like any other (see
:mod:`keyturn.plugin`): each imports only ``keyturn.plugin``."""
