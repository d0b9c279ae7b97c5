"""Engine handlers: checkpoints, EMA, learning-rate schedules, panels, reports, prediction writers, guards (modules imported on first access)."""

from bundle.packages import submodule_getattr

__getattr__ = submodule_getattr(__name__)
