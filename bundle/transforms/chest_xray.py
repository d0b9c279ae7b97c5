"""Load chest radiographs as grey images and their lung masks (one file, or a left/right pair merged).

Grey conversion follows the cDAL CXR recipe (METHODS.md 1.5): the image value is the mean of its R, G, B channels
on the 0-255 scale (for a grey file that is the grey value itself). Masks may have soft edges (the resized
collections do); they are thresholded at ``threshold`` (127: values > 127 are lung), except masks whose largest
value is 1, which are {0, 1} masks and are thresholded at 0. The lung is the positive class (1).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from bundle.data.errors import DataFormatError
from bundle.transforms.io import open_decoded_image

__all__ = ["read_grey_radiograph", "read_lung_mask", "LoadChestXrayd", "LoadLungMaskd"]

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def read_grey_radiograph(path: str | os.PathLike) -> np.ndarray:
    """Read an 8-bit (or 16-bit grey, rescaled) image as float32 (H, W) in [0, 255], the mean of R, G, B."""
    path = os.fspath(path)
    image = open_decoded_image(path)
    if image.mode in _SIXTEEN_BIT:
        array = np.asarray(image, dtype=np.float32)
        return array * (255.0 / 65535.0) if image.mode != "I" or array.max() > 255 else array
    if image.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"):
        raise DataFormatError(path, f"unsupported image mode {image.mode!r}: expected 8-bit grey or RGB")
    return np.asarray(image.convert("RGB"), dtype=np.float32).mean(axis=2)


def read_lung_mask(paths: str | os.PathLike | Sequence[str | os.PathLike], threshold: float = 127) -> np.ndarray:
    """Read one mask, or several (e.g. left and right lung) merged by union, as uint8 (H, W) in {0, 1}.

    Raises:
        DataFormatError: unreadable file, a colour mask whose channels differ, or merged masks of different sizes.
    """
    paths = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no mask file given")
    merged: np.ndarray | None = None
    for path in paths:
        image = open_decoded_image(path)
        array = np.asarray(image.convert("L") if image.mode in ("1", "P") else image)
        if array.ndim == 3:
            array = array[..., :3] if array.shape[2] >= 3 else array[..., :1]
            if not np.all(array == array[..., :1]):
                raise DataFormatError(path, f"mask of mode {image.mode!r} has channels that differ; expected grey")
            array = array[..., 0]
        mask = (array > (0 if array.max() <= 1 else threshold)).astype(np.uint8)
        if merged is not None and merged.shape != mask.shape:
            raise DataFormatError(path, f"mask size {mask.shape} differs from {paths[0]} size {merged.shape}")
        merged = mask if merged is None else np.maximum(merged, mask)
    return merged


class LoadChestXrayd(MapTransform):
    """Load a radiograph as a float32 ``MetaTensor`` (1, H, W) on the 0-255 scale (mean of R, G, B).

    The metadata hold ``filename_or_obj``, ``spatial_shape`` and ``original_channel_dim = 0``.
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = os.fspath(d[key])
            grey = read_grey_radiograph(path)
            meta = {"filename_or_obj": path, "spatial_shape": np.asarray(grey.shape), "original_channel_dim": 0}
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(grey[None])), meta=meta)
        return d


class LoadLungMaskd(MapTransform):
    """Load a lung mask (a path, or a list of paths merged by union) as float32 (1, H, W) in {0, 1}.

    The mask must have the size of the already loaded image under ``image_key``; otherwise DataFormatError names
    both files and sizes. ``filename_or_obj`` is the (first) mask file.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        image_key: str = "image",
        threshold: float = 127,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            paths = d[key] if isinstance(d[key], (list, tuple)) else [d[key]]
            paths = [os.fspath(p) for p in paths]
            mask = read_lung_mask(paths, self.threshold)
            image = d.get(self.image_key)
            if image is not None and hasattr(image, "shape") and tuple(image.shape[-2:]) != mask.shape:
                name = getattr(image, "meta", {}).get("filename_or_obj", "the image")
                raise DataFormatError(
                    paths[0],
                    f"mask size {mask.shape[0]}x{mask.shape[1]} (HxW) differs from image {name} size "
                    f"{image.shape[-2]}x{image.shape[-1]}",
                )
            meta = {"filename_or_obj": paths[0], "spatial_shape": np.asarray(mask.shape), "original_channel_dim": 0}
            d[key] = MetaTensor(torch.from_numpy(mask[None].astype(np.float32)), meta=meta)
        return d
