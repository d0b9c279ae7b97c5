"""Spatial augmentation the configs compose: a random affine with one zoom for both axes.

MoNuSeg's and the chest X-rays' training pipelines (configs/datasets/*.yaml, through train.yaml's
``affine_augmentation``) rotate by up to +-``rotate_degrees`` and zoom isotropically within ``scale_range``, as the
cDAL reference's torchvision ``RandomAffine`` does (METHODS.md section 1.5); MONAI's ``RandAffined`` draws one zoom
per axis, hence this subclass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from monai.config import KeysCollection
from monai.transforms import RandAffined
from monai.transforms.spatial.array import RandAffineGrid

__all__ = ["RandIsotropicAffined"]


class _IsotropicZoomAffineGrid(RandAffineGrid):
    """``RandAffineGrid`` drawing one zoom factor z for all spatial axes (scale parameter 1/z)."""

    def __init__(self, zoom_range: tuple[float, float] | None, spatial_dims: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.zoom_range = zoom_range
        self.spatial_dims = spatial_dims

    def randomize(self, data: Any = None) -> None:
        super().randomize(data)
        if self.zoom_range is not None:
            zoom = float(self.R.uniform(self.zoom_range[0], self.zoom_range[1]))
            # MONAI maps output to input coordinates: scale 1/z enlarges the content by z
            self.scale_params = [1.0 / zoom] * self.spatial_dims


class RandIsotropicAffined(RandAffined):
    """Random rotation and isotropic zoom, as torchvision's ``RandomAffine(degrees, scale=...)``.

    MONAI's ``RandAffined`` draws an independent scale per axis; this draws a single zoom factor
    z uniformly in ``zoom_range`` (z > 1 enlarges the content) and a rotation angle uniformly in
    ``[-rotate_degrees, rotate_degrees]``, shared by all keys of one call. Everything else
    (modes, padding, lazy resampling, inverse) is ``RandAffined``'s.

    Args:
        keys: keys of the (C, H, W) tensors to transform.
        rotate_degrees: maximum absolute rotation angle in degrees (2-D).
        zoom_range: (min, max) zoom factor, or None for no zoom.
        mode: interpolation per key (``"bilinear"`` for images, ``"nearest"`` for labels).
        padding_mode: outside values, ``"zeros"`` as torchvision's fill 0.
        prob: probability of transforming.
        spatial_size: output size (None = input size).
        spatial_dims: 2 for images.
        kwargs: further ``RandAffined`` arguments (``cache_grid``, ``device``, ``lazy``, ...).
    """

    def __init__(
        self,
        keys: KeysCollection,
        rotate_degrees: float = 22.0,
        zoom_range: tuple[float, float] | None = (0.75, 1.25),
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str | Sequence[str] = "zeros",
        prob: float = 1.0,
        spatial_size: Sequence[int] | int | None = None,
        spatial_dims: int = 2,
        **kwargs: Any,
    ) -> None:
        rotate_range = math.radians(float(rotate_degrees))
        super().__init__(
            keys,
            spatial_size=spatial_size,
            prob=prob,
            rotate_range=rotate_range,
            mode=mode,
            padding_mode=padding_mode,
            **kwargs,
        )
        if zoom_range is not None and not 0.0 < zoom_range[0] <= zoom_range[1]:
            raise ValueError(f"zoom_range must be (min, max) with 0 < min <= max, got {zoom_range}")
        self.rand_affine.rand_affine_grid = _IsotropicZoomAffineGrid(
            zoom_range=None if zoom_range is None else (float(zoom_range[0]), float(zoom_range[1])),
            spatial_dims=spatial_dims,
            rotate_range=rotate_range,
            device=self.rand_affine.rand_affine_grid.device,
        )
