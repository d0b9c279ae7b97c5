"""Diffusion-based medical image segmentation as a MONAI bundle (cDAL, SegDiff and baselines).

``import bundle`` makes every component reachable as an attribute (``bundle.data.monuseg``, ...), which is
what ``$import bundle`` in the bundle configs relies on. Layers, lowest first: ``runtime``; ``data``,
``transforms``, ``metrics``, ``networks``, ``losses``; ``inferers`` and ``diffusion``; ``handlers``; ``engines``
(nothing below ``engines`` imports it); ``reports``. See docs/architecture.md.
"""

from bundle import (  # noqa: F401
    data,
    diffusion,
    engines,
    handlers,
    inferers,
    losses,
    metrics,
    networks,
    reports,
    runtime,  # noqa: F401  (first: the lower layers import it)
    transforms,
)

__version__ = "0.1.0"

# an uncaught failure caused by an input file ends with "error: <file>: <problem>" (bundle/data/errors.py)
data.errors.install_excepthook()
