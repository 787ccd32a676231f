"""The handler registry: which IRequestHandler serves each requestType in this process.

Resolved once per process start, by the options (so a bad --handlers is a usage error before
anything starts); the services run what the options resolved.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from relaybus.interfaces import IRequestHandler


def registerHandlers(*sources: Any) -> dict[str, IRequestHandler]:
    """Collect handlers by requestType from handler objects, modules or dotted module names.

    A module contributes every module-level object that provides IRequestHandler.
    """
    registry: dict[str, IRequestHandler] = {}
    for source in sources:
        for handler in _handlersIn(source):
            if handler.requestType in registry:
                raise ValueError(f"two handlers serve requestType {handler.requestType!r}")
            registry[handler.requestType] = handler
    return registry


def _handlersIn(source: Any) -> list[IRequestHandler]:
    if isinstance(source, str):
        source = importlib.import_module(source)
    if isinstance(source, ModuleType):
        found = [value for value in vars(source).values()
                 if not isinstance(value, type) and IRequestHandler.providedBy(value)]
        if not found:
            raise ValueError(f"module {source.__name__} defines no IRequestHandler")
        return found
    if IRequestHandler.providedBy(source):
        return [source]
    raise TypeError(f"{source!r} is not a handler, a module or a module name")
