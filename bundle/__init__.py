"""Diffusion-based medical image segmentation as a MONAI bundle (cDAL, SegDiff and baselines)."""

__version__ = "0.1.0"
