"""The supervised step of a deterministic segmentation network (the U-Net baseline): loss(network(image), target).

The bundle's labels are {-1, 1}; the loss sees them as {0, 1} (``binary_target``), so MONAI's ``DiceCELoss``
(``sigmoid=True``) and the other losses on logits of independent channels apply unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from bundle.engines.steps.base import TrainingStep, binary_target

__all__ = ["SupervisedStep"]


class SupervisedStep(TrainingStep):
    """One update of the network named ``network`` with ``loss_function(logits, target)``.

    Args:
        loss_function: a loss on logits (B, C, *spatial) and {0, 1} targets of the same shape.
    """

    loss_keys = ("loss",)

    def __init__(self, loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.loss_function = loss_function

    def __call__(self, engine: Any, image: torch.Tensor, label: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        with engine.autocast():
            logits = engine.networks["network"](image)
        loss = self.loss_function(logits.float(), binary_target(label))
        self.update(engine, "network", loss)
        return {"loss": loss.detach()}
