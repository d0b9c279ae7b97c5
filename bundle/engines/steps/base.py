"""What a training step is: the per-method part of an iteration of ``bundle.engines.trainer.SegmentationTrainer``.

A step declares the names of the networks and optimizers it uses (the trainer checks the config gives them) and the
names of the losses it returns (they reach the StatsHandler and MLflow under those names), and updates the networks
from one prepared batch. ``update`` is the one optimiser update every step uses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

__all__ = ["TrainingStep", "binary_target"]


def binary_target(label: torch.Tensor) -> torch.Tensor:
    """Labels in {0, 1} or {-1, 1} (any shape) -> float {0, 1}, foreground where > 0."""
    return (torch.as_tensor(label) > 0).float()


class TrainingStep(ABC):
    """One training iteration of a method; see the module docstring.

    Attributes:
        network_names: names in the trainer's ``networks`` this step trains (the first is the main one).
        optimizer_names: names in the trainer's ``optimizers`` this step steps.
        loss_keys: the losses ``__call__`` returns, the first being the one reported as ``loss``.
    """

    network_names: tuple[str, ...] = ("network",)
    optimizer_names: tuple[str, ...] = ("network",)
    loss_keys: tuple[str, ...] = ("loss",)

    def attach(self, engine: Any) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Called once by the trainer that runs this step (for steps that need engine events)."""

    @abstractmethod
    def __call__(
        self, engine: Any, image: torch.Tensor, label: torch.Tensor, batch: dict[str, Any]
    ) -> dict[str, torch.Tensor]:
        """Update the networks from ``image`` (B, C_img, *spatial) and ``label`` (B, C, *spatial) in {-1, 1};
        ``batch`` is the raw batch (for extra keys). Returns the detached scalar losses named ``loss_keys``."""

    @staticmethod
    def update(engine: Any, optimizer_name: str, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` and step the named optimizer (its gradients cleared first)."""
        optimizer = engine.optimizers[optimizer_name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
