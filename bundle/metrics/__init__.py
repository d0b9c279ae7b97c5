"""Metrics components of the bundle; configs reach every module as `bundle.metrics.<module>`."""

from bundle.packages import submodule_getattr

__getattr__ = submodule_getattr(__name__)
