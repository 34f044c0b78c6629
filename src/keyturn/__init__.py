"""keyturn: durable, resumable credential rotation for the Dfns API."""

__version__ = "0.1.0"
