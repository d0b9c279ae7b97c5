"""Lazy sub-modules: ``bundle.<package>.<module>`` is imported the first time a config (or code) reaches it.

``import bundle`` itself imports nothing else and changes no global state; ``$bundle.data.monuseg.build_...`` in a
config then imports ``bundle.data`` and ``bundle.data.monuseg`` on first access (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType


def submodule_getattr(package: str) -> Callable[[str], ModuleType]:
    """A module-level ``__getattr__`` for ``package`` that imports ``package.<name>`` on first access."""

    def getattr_submodule(name: str) -> ModuleType:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"{package}.{name}":
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
            raise

    return getattr_submodule
