"""Diffusion components of the bundle."""

from bundle.diffusion import ensemble_inferer, samplers, schedules  # noqa: F401
