"""Data components of the bundle."""

from bundle.data import aperio, datalists, errors, monuseg, synthetic  # noqa: F401
