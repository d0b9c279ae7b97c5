"""Dictionary transforms for multi-annotator data: load a LIDC case, draw or combine annotators.

- :class:`LoadLIDCd`: ``image`` (a path or pickle ref) -> (1, H, W) float32; ``label`` (list of A refs) -> ``annotations``
  (A, H, W) float32 in {0, 1}. JPEG/PNG masks are thresholded at 127 (the crops carry JPEG noise); JPEG/PNG images
  are scaled to [0, 1]; pickle images are kept as stored (Knegt's pickle: floats in [0, 1]).
- :class:`RandSelectAnnotatord`: training draws one annotator per sample (as Knegt's loader and the Prob. U-Net):
  ``label`` (1, H, W) = ``annotations[k]`` with k uniform; ``annotations`` stay for methods that use all of them.
- :class:`SelectAnnotatord`: a fixed reference for evaluation: the majority vote (foreground where at least half of
  the annotators mark it; 2 of 4 counts as foreground), the first annotator, or a given index.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform

from bundle.data.errors import DataFormatError
from bundle.data.lidc import LIDC_MASK_THRESHOLD, PICKLE_REF_SEPARATOR, PICKLE_SUFFIXES, read_lidc_pickle_entry
from bundle.transforms.io import open_decoded_image

__all__ = ["read_grey_image", "read_thresholded_mask", "LoadLIDCd", "RandSelectAnnotatord", "SelectAnnotatord"]


def read_grey_image(path: str | os.PathLike) -> np.ndarray:
    """A grey image file as float32 (H, W): 8-bit files scaled to [0, 1]; colour files converted to grey first."""
    path = os.fspath(path)
    image = open_decoded_image(path)
    if image.mode in ("I;16", "I;16B", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        return array / 65535.0 if image.mode.startswith("I;16") else array
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        raise DataFormatError(path, f"unsupported image mode {image.mode!r}: expected grey or 8-bit colour")
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def read_thresholded_mask(path: str | os.PathLike, threshold: int = LIDC_MASK_THRESHOLD) -> np.ndarray:
    """An 8-bit mask file as uint8 (H, W) in {0, 1}: grey value > ``threshold`` is foreground."""
    path = os.fspath(path)
    image = open_decoded_image(path)
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        raise DataFormatError(path, f"unsupported mask mode {image.mode!r}: expected an 8-bit grey mask")
    grey = np.asarray(image.convert("L"))
    return (grey > threshold).astype(np.uint8)


def _pickle_ref(ref: str) -> tuple[str, str] | None:
    """(pickle path, rest) when ``ref`` points into a pickle, else None."""
    if PICKLE_REF_SEPARATOR not in ref:
        return None
    path, rest = ref.split(PICKLE_REF_SEPARATOR, 1)
    return (path, rest) if path.lower().endswith(PICKLE_SUFFIXES) else None


class LoadLIDCd(MapTransform):
    """Load a LIDC case (either layout of ``bundle.data.lidc``).

    Args:
        image_key: key of the image ref; becomes a (1, H, W) float32 ``MetaTensor``.
        label_key: key of the list of A mask refs (annotator order).
        annotations_key: output key of the (A, H, W) float32 ``MetaTensor`` in {0, 1}.
        threshold: grey-value threshold of mask files (> threshold is foreground).

    Raises:
        DataFormatError: unreadable files, bad mask values, or a mask whose size differs from the image's.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        annotations_key: str = "annotations",
        threshold: int = LIDC_MASK_THRESHOLD,
    ) -> None:
        super().__init__([image_key, label_key])
        self.image_key, self.label_key, self.annotations_key = image_key, label_key, annotations_key
        self.threshold = threshold

    def _read(self, image_ref: str, mask_refs: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        in_pickle = _pickle_ref(image_ref)
        if in_pickle is not None:
            image, masks = read_lidc_pickle_entry(*in_pickle)
            indices = []
            for ref in mask_refs:
                target = _pickle_ref(ref)
                key, _, index = (target[1] if target else "").rpartition(PICKLE_REF_SEPARATOR)
                if target is None or key != in_pickle[1] or not index.isdigit() or int(index) >= len(masks):
                    raise DataFormatError(ref, f"is not a mask ref of {image_ref} (expected '{image_ref}::<k>')")
                indices.append(int(index))
            return image, [masks[i] for i in indices]
        image = read_grey_image(image_ref)
        masks = []
        for ref in mask_refs:
            mask = read_thresholded_mask(ref, self.threshold)
            if mask.shape != image.shape:
                raise DataFormatError(
                    ref,
                    f"mask size {mask.shape[0]}x{mask.shape[1]} differs from image {image_ref} size "
                    f"{image.shape[0]}x{image.shape[1]}",
                )
            masks.append(mask)
        return image, masks

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_ref = os.fspath(d[self.image_key])
        refs = d[self.label_key]
        refs = [os.fspath(r) for r in ([refs] if isinstance(refs, (str, os.PathLike)) else refs)]
        if not refs:
            raise DataFormatError(image_ref, "case has no annotator masks")
        image, masks = self._read(image_ref, refs)
        shape = np.asarray(image.shape)
        d[self.image_key] = MetaTensor(
            torch.from_numpy(np.ascontiguousarray(image[None])),
            meta={"filename_or_obj": image_ref, "spatial_shape": shape, "original_channel_dim": 0},
        )
        d[self.annotations_key] = MetaTensor(
            torch.from_numpy(np.stack(masks).astype(np.float32)),
            meta={"filename_or_obj": refs[0], "spatial_shape": shape, "original_channel_dim": 0},
        )
        return d


class RandSelectAnnotatord(RandomizableTransform, MapTransform):
    """``label`` = one annotator drawn uniformly per call: (1, H, W) from ``annotations`` (A, H, W).

    Args:
        annotations_key: key of the (A, H, W) annotations (left unchanged).
        label_key: output key.
    """

    def __init__(self, annotations_key: str = "annotations", label_key: str = "label") -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, [annotations_key])
        self.annotations_key, self.label_key = annotations_key, label_key
        self._index = 0

    def randomize(self, data: Any = None) -> None:
        self._index = int(self.R.randint(0, int(data)))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        annotations = d[self.annotations_key]
        self.randomize(annotations.shape[0])
        d[self.label_key] = annotations[self._index : self._index + 1].clone()
        return d


class SelectAnnotatord(MapTransform):
    """``label`` (1, H, W) from ``annotations`` (A, H, W): a fixed reference annotation.

    Args:
        annotations_key: key of the annotations (values > ``foreground_threshold`` are foreground).
        label_key: output key.
        mode: ``"majority"`` (foreground where at least half of the annotators mark it), ``"first"``, or an index.
        foreground_threshold: annotation values above it are foreground (0.0 serves {0, 1} and {-1, 1}).
        values: (background, foreground) values written to ``label``.
    """

    def __init__(
        self,
        annotations_key: str = "annotations",
        label_key: str = "label",
        mode: str | int = "majority",
        foreground_threshold: float = 0.0,
        values: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__([annotations_key])
        if not (mode in ("majority", "first") or isinstance(mode, int)):
            raise ValueError(f"mode must be 'majority', 'first' or an annotator index, got {mode!r}")
        self.annotations_key, self.label_key, self.mode = annotations_key, label_key, mode
        self.foreground_threshold, self.values = foreground_threshold, values

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        annotations = d[self.annotations_key]
        foreground = annotations > self.foreground_threshold
        if self.mode == "majority":
            selected = foreground.float().mean(0, keepdim=True) >= 0.5
        else:
            index = 0 if self.mode == "first" else int(self.mode)
            if not -annotations.shape[0] <= index < annotations.shape[0]:
                raise ValueError(f"annotator index {index} out of range for {annotations.shape[0]} annotators")
            selected = foreground[index : index + 1]
        label = torch.where(selected, self.values[1], self.values[0]).to(torch.float32)
        if isinstance(annotations, MetaTensor):
            label = MetaTensor(label, meta=dict(annotations.meta))
        d[self.label_key] = label
        return d
