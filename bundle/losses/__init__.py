"""Method losses that are not one-liners (modules imported on first access)."""

from bundle.packages import submodule_getattr

__getattr__ = submodule_getattr(__name__)
