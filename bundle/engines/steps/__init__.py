"""The methods' training steps (one per method family) (modules imported on first access)."""

from bundle.packages import submodule_getattr

__getattr__ = submodule_getattr(__name__)
