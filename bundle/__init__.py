"""Diffusion-based medical image segmentation as a MONAI bundle (cDAL, SegDiff and baselines).

``import bundle`` makes every component reachable as an attribute (``bundle.data.monuseg``, ...), which is
what ``$import bundle`` in the bundle configs relies on.
"""

from bundle import data, diffusion, engines, metrics, networks, reports, transforms  # noqa: F401

__version__ = "0.1.0"
