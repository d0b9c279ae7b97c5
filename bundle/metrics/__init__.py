"""Metrics components of the bundle."""

from bundle.metrics import binary  # noqa: F401
