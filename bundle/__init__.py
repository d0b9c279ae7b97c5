"""Diffusion-based medical image segmentation as a MONAI bundle (cDAL, SegDiff and baselines).

``$import bundle`` in the configs makes every component reachable as an attribute (``bundle.data.monuseg``, ...):
sub-packages and their modules are imported on first access (bundle/packages.py), and importing the package changes
no global state. Layers, lowest first: ``runtime``; ``data``, ``transforms``, ``metrics``, ``networks``, ``losses``;
``inferers`` and ``diffusion``; ``handlers``; ``engines`` (nothing below ``engines`` imports it); ``reports``; the
``composer`` of config files. See docs/architecture.md.
"""

from bundle.packages import submodule_getattr

__version__ = "0.1.0"

__getattr__ = submodule_getattr(__name__)
