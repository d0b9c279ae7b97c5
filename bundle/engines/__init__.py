"""Engines components of the bundle."""

from bundle.engines import cdal_trainer, checkpoint, panels, report_writer, seeding  # noqa: F401
