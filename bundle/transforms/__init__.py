"""Transforms components of the bundle."""

from bundle.transforms import ensemble, intensity, io, recipes, writers  # noqa: F401
