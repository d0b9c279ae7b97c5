"""Post-processing of ``EnsembleDiffusionInferer`` dict outputs inside MONAI evaluators."""

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
