"""Post-processing of ``EnsembleInferer`` dict outputs inside MONAI evaluators."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import MapTransform


class SplitEnsembleOutputd(MapTransform):
    """Turn ``{"pred": {"mean": m, "uncertainty": u, ...}}`` into ``{"pred": m, "uncertainty": u, ...}``.

    A ``pred`` that is already a tensor passes through unchanged.
    """

    def __init__(self, keys: str = "pred", mean_key: str = "mean") -> None:
        super().__init__(keys)
        self.mean_key = mean_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, Mapping):
                for name, item in value.items():
                    if name != self.mean_key:
                        d[name] = item
                d[key] = value[self.mean_key]
        return d


class ReduceChannelsd(MapTransform):
    """Reduce channels ``first_channel:`` of each key to one channel (keepdim) with ``max`` or ``mean``.

    Used for the served uncertainty of a multi-class model: the largest (or mean) per-class standard deviation
    over the foreground classes, (C, *spatial) -> (1, *spatial). A MetaTensor keeps its metadata and transform
    history, so ``Invertd`` can still undo the preprocessing on the result.
    """

    def __init__(self, keys, reduction: str = "max", first_channel: int = 0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if reduction not in ("max", "mean"):
            raise ValueError(f"reduction must be 'max' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self.first_channel = int(first_channel)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if value.shape[0] <= self.first_channel:
                raise ValueError(f"{key}: {value.shape[0]} channels, cannot reduce from channel {self.first_channel}")
            part = value[self.first_channel :]
            d[key] = part.amax(dim=0, keepdim=True) if self.reduction == "max" else part.mean(dim=0, keepdim=True)
        return d
