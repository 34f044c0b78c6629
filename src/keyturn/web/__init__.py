"""The operator surface over HTTP (`keyturn serve`). It uses the engine's operator service and
the ports, never the store's tables directly (an import-linter contract says so)."""
