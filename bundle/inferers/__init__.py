"""Inferers: the one ensemble inferer, the samplers it drives and reduced-precision network calls (modules imported on first access)."""

from bundle.packages import submodule_getattr

__getattr__ = submodule_getattr(__name__)
