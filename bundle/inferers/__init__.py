"""Inferers: the one ensemble inferer, the samplers it drives and reduced-precision network calls."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
