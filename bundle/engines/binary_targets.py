"""Binary training targets for the losses that need {0, 1}: the bundle's labels are {-1, 1} (cDAL's convention).

``PrepareBinaryTargetBatch`` is a MONAI ``prepare_batch`` for ``SupervisedTrainer`` (the U-Net baseline with
``DiceCELoss(sigmoid=True)``): it returns (image, label > 0 as float), so the same data pipeline serves every method.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import PrepareBatch, default_prepare_batch

__all__ = ["binary_target", "PrepareBinaryTargetBatch"]


def binary_target(label: torch.Tensor) -> torch.Tensor:
    """Labels in {0, 1} or {-1, 1} (any shape) -> float {0, 1}, foreground where > 0."""
    return (torch.as_tensor(label) > 0).float()


class PrepareBinaryTargetBatch(PrepareBatch):
    """(image, binary label) from a batch dict, moved to ``device``."""

    def __call__(
        self, batchdata: dict[str, torch.Tensor], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if label is None:
            raise ValueError("the batch has no label")
        return image, binary_target(label)
