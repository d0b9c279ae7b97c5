"""The cDAL MoNuSeg preprocessing pipelines (METHODS.md section 1.5) as MONAI ``Compose`` objects.

Train: load -> Resize 512 -> RandomCrop 256 -> h/v flips -> Affine(+-22 deg, zoom 0.75-1.25)
-> ColorJitter(.4, .4, .4, .1) -> normalise on the 0-255 scale with mean (142.07, 98.48, 132.96),
std (65.78, 57.05, 57.78); label >0 -> 1, then 2m - 1. Eval: load -> Resize 512 -> normalise.

The builders are plain functions with keyword arguments so bundle configs can call them::

    train_transforms:
      _target_: bundle.transforms.recipes.cdal_monuseg_train_transforms
      image_size: 512
      patch_size: 256

The deterministic part (loading + resizing) comes first, so ``CacheDataset`` caches exactly it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    EnsureTyped,
    NormalizeIntensityd,
    RandAffined,
    RandFlipd,
    RandSpatialCropd,
    Resized,
    ScaleIntensityRanged,
    Transform,
)
from monai.transforms.spatial.array import RandAffineGrid

from bundle.transforms.intensity import RandColorJitterd
from bundle.transforms.io import LoadInstanceMaskd, LoadTiled

__all__ = [
    "RandIsotropicAffined",
    "cdal_monuseg_train_transform_lists",
    "cdal_monuseg_train_transforms",
    "cdal_monuseg_eval_transforms",
]

MONUSEG_MEAN = (142.07, 98.48, 132.96)
MONUSEG_STD = (65.78, 57.05, 57.78)


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


def _load_and_resize(
    image_key: str, label_key: str | None, image_size: int | None, image_interp: str
) -> list[Transform]:
    """Deterministic head: load the tile (and label) and resize to ``image_size`` squared."""
    transforms: list[Transform] = [LoadTiled(keys=image_key)]
    if label_key is not None:
        transforms.append(LoadInstanceMaskd(keys=label_key, image_key=image_key))
    if image_size is not None:
        size = (int(image_size), int(image_size))
        anti_alias = image_interp in ("bilinear", "bicubic")
        transforms.append(Resized(keys=image_key, spatial_size=size, mode=image_interp, anti_aliasing=anti_alias))
        if label_key is not None:
            transforms.append(Resized(keys=label_key, spatial_size=size, mode="nearest-exact"))
    return transforms


def _normalise(image_key: str, label_key: str | None, mean: Sequence[float], std: Sequence[float]) -> list[Transform]:
    """Channel-wise (x - mean) / std on the 0-255 scale; label {0, 1} -> {-1, 1}; float32."""
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel, got mean={mean}, std={std}")
    transforms: list[Transform] = [
        NormalizeIntensityd(keys=image_key, subtrahend=list(mean), divisor=list(std), channel_wise=True)
    ]
    keys = [image_key]
    if label_key is not None:
        transforms.append(ScaleIntensityRanged(keys=label_key, a_min=0.0, a_max=1.0, b_min=-1.0, b_max=1.0))
        keys.append(label_key)
    transforms.append(EnsureTyped(keys=keys, dtype=torch.float32))
    return transforms


def cdal_monuseg_train_transform_lists(
    image_size: int = 512,
    patch_size: int = 256,
    mean: Sequence[float] = MONUSEG_MEAN,
    std: Sequence[float] = MONUSEG_STD,
    rotate_degrees: float = 22.0,
    scale_range: tuple[float, float] | None = (0.75, 1.25),
    jitter: Sequence[float] | None = (0.4, 0.4, 0.4, 0.1),
    flips: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    image_interp: str = "bilinear",
) -> tuple[list[Transform], list[Transform]]:
    """The cDAL MoNuSeg training pipeline as (deterministic, random) transform lists.

    See :func:`cdal_monuseg_train_transforms` for the arguments and outputs.
    """
    if patch_size > image_size:
        raise ValueError(f"patch_size {patch_size} must not exceed image_size {image_size}")
    keys = [image_key, label_key]
    deterministic = _load_and_resize(image_key, label_key, image_size, image_interp)
    random: list[Transform] = [RandSpatialCropd(keys=keys, roi_size=(patch_size, patch_size), random_size=False)]
    if flips:
        random += [RandFlipd(keys=keys, prob=0.5, spatial_axis=0), RandFlipd(keys=keys, prob=0.5, spatial_axis=1)]
    if rotate_degrees or scale_range is not None:
        random.append(
            RandIsotropicAffined(
                keys=keys,
                rotate_degrees=rotate_degrees,
                zoom_range=scale_range,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                prob=1.0,
                spatial_size=(patch_size, patch_size),
                cache_grid=True,
            )
        )
    if jitter is not None:
        brightness, contrast, saturation, hue = jitter
        random.append(
            RandColorJitterd(keys=image_key, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        )
    random += _normalise(image_key, label_key, mean, std)
    return deterministic, random


def cdal_monuseg_train_transforms(
    image_size: int = 512,
    patch_size: int = 256,
    mean: Sequence[float] = MONUSEG_MEAN,
    std: Sequence[float] = MONUSEG_STD,
    rotate_degrees: float = 22.0,
    scale_range: tuple[float, float] | None = (0.75, 1.25),
    jitter: Sequence[float] | None = (0.4, 0.4, 0.4, 0.1),
    flips: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    image_interp: str = "bilinear",
) -> Compose:
    """The cDAL MoNuSeg training pipeline.

    Input: a datalist entry ``{image_key: tile path, label_key: .xml or mask path}``.
    Output: ``image`` float32 (3, P, P), channel-wise normalised (about zero mean, unit std on
    MoNuSeg; affine padding is 0 before normalising, i.e. -mean/std after); ``label`` float32
    (1, P, P) with values exactly in {-1, 1} (P = ``patch_size``).

    Args:
        image_size: side the whole tile is resized to (bilinear with anti-aliasing for the image,
            nearest for the label) before cropping.
        patch_size: side of the random crop.
        mean, std: per-channel statistics on the 0-255 scale.
        rotate_degrees: rotation range +-degrees (0 and ``scale_range=None`` skip the affine).
        scale_range: isotropic zoom range (torchvision ``scale``), or None.
        jitter: (brightness, contrast, saturation, hue) strengths, or None to skip.
        flips: random horizontal and vertical flips, each with probability 0.5.
        image_key, label_key: datalist keys.
        image_interp: ``Resized`` mode for the image (``"bilinear"``, ``"area"``, ...).
    """
    deterministic, random = cdal_monuseg_train_transform_lists(
        image_size=image_size,
        patch_size=patch_size,
        mean=mean,
        std=std,
        rotate_degrees=rotate_degrees,
        scale_range=scale_range,
        jitter=jitter,
        flips=flips,
        image_key=image_key,
        label_key=label_key,
        image_interp=image_interp,
    )
    return Compose(deterministic + random)


def cdal_monuseg_eval_transforms(
    image_size: int | None = 512,
    mean: Sequence[float] = MONUSEG_MEAN,
    std: Sequence[float] = MONUSEG_STD,
    image_key: str = "image",
    label_key: str | None = "label",
    image_interp: str = "bilinear",
) -> Compose:
    """The cDAL MoNuSeg evaluation pipeline: load, resize to ``image_size`` squared, normalise.

    Output: ``image`` float32 (3, S, S) normalised as in training; ``label`` float32 (1, S, S) in
    {-1, 1}, or no label when ``label_key`` is None (inference). ``image_size=None`` keeps the
    native size.
    """
    deterministic = _load_and_resize(image_key, label_key, image_size, image_interp)
    return Compose(deterministic + _normalise(image_key, label_key, mean, std))
