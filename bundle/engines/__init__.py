"""Engines components of the bundle; every module is imported so configs can reach it as `bundle.engines.<module>`."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
