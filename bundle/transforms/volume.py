"""Volumes for a 2-D model: checking image/label pairs, 3-D crops -> axial slices, and per-voxel class votes.

The cDAL Hippocampus protocol (METHODS.md 1.5-1.6) trains a 2-D network on axial slices of random 32^3 crops
(4 per volume, half centred on the structure) and predicts a volume slice by slice; the ensemble mean of each
class channel is rounded (> 0.5) and the voxel takes the arg max over channels (ties go to the lower class, a
voxel with no vote is background). Per-volume metrics then exclude the background channel.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import CommonKeys

from bundle.data.errors import DataFormatError

__all__ = [
    "CheckVolumePaird",
    "neighbour_slices",
    "StackNeighbourSlicesd",
    "volumes_to_slices",
    "slices_to_volumes",
    "prepare_slice_batch",
    "VoteArgmaxd",
]


def _filename(value: Any, fallback: str) -> str:
    meta = getattr(value, "meta", None) or {}
    name = meta.get("filename_or_obj", fallback)
    return os.fspath(name[0] if isinstance(name, (list, tuple)) else name)


class CheckVolumePaird(MapTransform):
    """Check a loaded image/label volume pair; raise DataFormatError naming the label file when it is unusable.

    Checks: both are channel-first (C, H, W, D) with the same spatial shape; the label has one channel and only
    values from ``class_values`` (integers; a float label such as 1.0 is accepted, 1.5 is not); when both carry an
    ``affine`` in their metadata, the affines agree within ``affine_tolerance`` (else the label would be
    reoriented differently from its image). Put it right after ``LoadImaged(..., ensure_channel_first=True)``.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        image_key: str = "image",
        class_values: Sequence[int] = (0, 1, 2),
        affine_tolerance: float = 1e-3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.class_values = sorted(int(v) for v in class_values)
        self.affine_tolerance = affine_tolerance

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        image_name = _filename(image, "the image")
        for key in self.key_iterator(d):
            label = d[key]
            name = _filename(label, str(key))
            if label.ndim != 4 or image.ndim != 4:
                raise DataFormatError(
                    name,
                    f"expected channel-first 3-D volumes, got label shape "
                    f"{tuple(label.shape)} and image {image_name} shape {tuple(image.shape)}",
                )
            if tuple(label.shape[1:]) != tuple(image.shape[1:]):
                raise DataFormatError(
                    name,
                    f"label shape {tuple(label.shape[1:])} differs from image {image_name} "
                    f"shape {tuple(image.shape[1:])}",
                )
            if label.shape[0] != 1:
                raise DataFormatError(name, f"label must have one channel of class values, got {label.shape[0]}")
            values = torch.unique(torch.as_tensor(label)).cpu().numpy()
            bad = [v for v in values.tolist() if v != round(v) or int(round(v)) not in self.class_values]
            if bad:
                shown = ", ".join(f"{v:g}" for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
                raise DataFormatError(name, f"label values {shown} are outside the class list {self.class_values}")
            affines = [getattr(x, "meta", {}).get("affine") for x in (image, label)]
            if all(a is not None for a in affines):
                gap = float(np.abs(np.asarray(affines[0], float) - np.asarray(affines[1], float)).max())
                if gap > self.affine_tolerance:
                    raise DataFormatError(name, f"affine differs from image {image_name} by up to {gap:.4g}")
        return d


def neighbour_slices(volume: torch.Tensor, context: int, axis: int = 2) -> torch.Tensor:
    """2.5-D input: each slice with its ``context`` neighbours on either side as extra channels.

    ``volume`` (C, *spatial) with slices along spatial ``axis`` -> (C * (2 * context + 1), *spatial), where
    channel block j (j = 0..2 * context) at slice d holds slice ``clamp(d + j - context, 0, D - 1)``: the block
    ``context`` is the volume itself, lower blocks the slices before, higher blocks the slices after, and the
    first and last slices repeat past the volume's borders. ``context`` 0 returns the volume unchanged.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if context == 0:
        return volume
    if not 0 <= axis < volume.ndim - 1:
        raise ValueError(f"slice axis {axis} is not a spatial axis of a volume of shape {tuple(volume.shape)}")
    dim = axis + 1
    depth = volume.shape[dim]
    offsets = torch.arange(-context, context + 1, device=volume.device)
    index = (torch.arange(depth, device=volume.device)[None, :] + offsets[:, None]).clamp(0, depth - 1)
    blocks = [torch.index_select(torch.as_tensor(volume), dim, row) for row in index]
    return torch.cat(blocks, dim=0)


class StackNeighbourSlicesd(MapTransform):
    """Dictionary form of :func:`neighbour_slices` (2.5-D context); the label is left alone (the centre slice).

    Metadata (affine, applied operations) is kept, so ``Invertd`` of a prediction made from the stacked image
    inverts the spatial transforms as for the single-channel image. Apply it after the intensity scaling, before
    any crop, so that every slice's neighbours come from the whole volume.
    """

    def __init__(self, keys: KeysCollection = "image", context: int = 0, axis: int = 2, allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        if int(context) < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        self.context, self.axis = int(context), int(axis)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if self.context:
                value = d[key]
                plain = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
                stacked = neighbour_slices(plain, self.context, self.axis)
                if hasattr(value, "meta"):
                    from monai.data import MetaTensor

                    stacked = MetaTensor(
                        stacked, meta=dict(value.meta), applied_operations=list(value.applied_operations)
                    )
                d[key] = stacked
        return d


def volumes_to_slices(volumes: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W, D) -> (B * D, C, H, W): the D slices along the last (axial) axis, volume-major."""
    if volumes.ndim != 5:
        raise ValueError(f"expected (B, C, H, W, D) volumes, got shape {tuple(volumes.shape)}")
    b, c, h, w, d = volumes.shape
    return volumes.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)


def slices_to_volumes(slices: torch.Tensor, depth: int) -> torch.Tensor:
    """Inverse of :func:`volumes_to_slices`: (B * D, C, H, W) -> (B, C, H, W, D)."""
    if slices.ndim != 4 or slices.shape[0] % depth:
        raise ValueError(f"expected (B * {depth}, C, H, W) slices, got shape {tuple(slices.shape)}")
    bd, c, h, w = slices.shape
    return slices.reshape(bd // depth, depth, c, h, w).permute(0, 2, 3, 4, 1)


def prepare_slice_batch(
    batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``prepare_batch`` for MONAI trainers: a batch of 3-D crops becomes one batch of their axial slices.

    ``batchdata["image"]`` (B, C_img, H, W, D) and ``batchdata["label"]`` (B, C, H, W, D) -> (image, label) of
    shapes (B * D, C_img, H, W) and (B * D, C, H, W), moved to ``device``. 2-D batches pass through unchanged.
    """
    image, label = batchdata[CommonKeys.IMAGE], batchdata[CommonKeys.LABEL]
    if image.ndim == 5:
        image, label = volumes_to_slices(image), volumes_to_slices(label)
    image = torch.as_tensor(image).to(device=device, non_blocking=non_blocking, **kwargs)
    label = torch.as_tensor(label).to(device=device, non_blocking=non_blocking, **kwargs)
    return image, label


class VoteArgmaxd(MapTransform):
    """Class votes -> one label per voxel, as one-hot channels for the per-class metrics.

    ``pred`` (C, *spatial), the ensemble mean probability per class channel in [0, 1], becomes the one-hot
    (float {0, 1}) encoding of ``argmax_c [pred_c > threshold]`` (ties: the lower class; no vote: class 0). The
    label under ``label_key`` (one-hot, in {-1, 1} or {0, 1}) is binarised (> 0). Without ``include_background``
    channel 0 is dropped from ``pred``, the label and ``uncertainty_key`` (if present), so metrics that average
    over channels average over the foreground classes only, as MONAI's ``DiceMetric(include_background=False)``.
    ``class_names`` (one per kept channel) is stored under ``"class_names"`` for the report writer.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        label_key: str | None = "label",
        uncertainty_key: str | None = "uncertainty",
        threshold: float = 0.5,
        include_background: bool = False,
        class_names: Sequence[str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key, self.uncertainty_key = label_key, uncertainty_key
        self.threshold = threshold
        self.first = 0 if include_background else 1
        self.class_names = list(class_names) if class_names is not None else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            channels = pred.shape[0]
            if channels < 2:
                raise ValueError(f"VoteArgmaxd needs at least 2 class channels in {key!r}, got shape {pred.shape}")
            votes = (torch.as_tensor(pred) > self.threshold).float()
            winner = votes.argmax(dim=0, keepdim=True)  # first maximum: ties go to the lower class
            onehot = torch.zeros_like(votes).scatter_(0, winner, 1.0)
            d[key] = _like(pred, onehot[self.first :])
            if self.label_key is not None and self.label_key in d:
                label = d[self.label_key]
                if label.shape[0] != channels:
                    raise ValueError(f"label has {label.shape[0]} channels, prediction {channels}")
                d[self.label_key] = _like(label, (torch.as_tensor(label) > 0).float()[self.first :])
            if self.uncertainty_key is not None and self.uncertainty_key in d:
                d[self.uncertainty_key] = d[self.uncertainty_key][self.first :]
            if self.class_names is not None:
                if len(self.class_names) != channels - self.first:
                    raise ValueError(f"{len(self.class_names)} class_names for {channels - self.first} channels")
                d["class_names"] = list(self.class_names)
        return d


def _like(reference: Any, values: torch.Tensor) -> Any:
    """``values`` as a MetaTensor with ``reference``'s metadata when ``reference`` is one."""
    if hasattr(reference, "meta"):
        from monai.data import MetaTensor

        return MetaTensor(values, meta=dict(reference.meta))
    return values
