"""Engine handlers: checkpoints, EMA, learning-rate schedules, panels, reports, prediction writers, guards."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
