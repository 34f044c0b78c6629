"""Structured logging: human-readable on a terminal, JSON lines with --log-format json.

Importing structlog costs a read-only command a noticeable share of its start-up (it brings in
rich's traceback renderer), and most commands never log. So :func:`configure` applies at once
only when structlog is already imported; otherwise it records the settings and applies them the
moment anything imports structlog, before that module can log a line.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

_pending: tuple[str, str] | None = None
_orjson: Any = None  # orjson, imported with structlog's set-up (not at this module's import)


def _orjson_text(value: Any, **kw: Any) -> str:
    """JSON lines by orjson (a worker logs every action; the standard encoder costs more).
    Used only once structlog, and so orjson, is being set up: see :func:`_apply`."""
    return str(_orjson.dumps(value, default=kw.get("default")).decode())


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Log as `fmt` (auto, console or json) at `level`, now or when structlog is first imported."""
    global _pending
    if "structlog" in sys.modules:
        _pending = None
        _apply(fmt, level)
        return
    if _pending is None:
        sys.meta_path.insert(0, _ApplyAfterImport())
    _pending = (fmt, level)


def _apply(fmt: str, level: str) -> None:
    global _orjson
    import orjson
    import structlog

    _orjson = orjson

    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_text)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if fmt == "json" else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


class _ApplyAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when structlog is about to be imported it lets the other finders
    find it and wraps its loader, so the recorded settings apply once the module has run."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "structlog":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _ConfiguringLoader(spec.loader)
        return spec


class _ConfiguringLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        settings = _pending
        if settings is not None:
            _apply(*settings)
