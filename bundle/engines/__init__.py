"""The training engine and the methods' training steps (modules imported on first access)."""

from bundle.packages import submodule_getattr

__getattr__ = submodule_getattr(__name__)
