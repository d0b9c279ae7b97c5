"""The denoising step of diffusion segmentation methods that regress one target (SegDiff; MedSegDiff-like).

Per batch (METHODS.md section 2): draw a time index i ~ U{0 .. T-1} per sample and eps ~ N(0, I), form
x_{i+1} = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps from the label x0 in {-1, 1} (MONAI's ``add_noise``), call
``network(x_{i+1}, i, image=image)`` and regress the target that the scheduler's ``prediction_type`` names: the
noise (``epsilon``, SegDiff), the label (``sample``) or the velocity (``v_prediction``). SegDiff's loss is the
per-sample SUM of squared errors over channels and pixels, averaged over the batch (the reference's
``terms["sum"]``: ``reduction="sum"``); ``reduction="mean"`` averages over the pixels too.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.schedulers import Scheduler

from bundle.engines.steps.base import TrainingStep

__all__ = ["DenoisingStep", "denoising_loss"]


def denoising_loss(target: torch.Tensor, prediction: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Mean over the batch of the per-sample sum (or mean) of squared errors: (B, C, *spatial) x 2 -> scalar."""
    if target.shape != prediction.shape:
        raise ValueError(f"the prediction {tuple(prediction.shape)} differs from the target {tuple(target.shape)}")
    per_sample = (target - prediction.float()).pow(2).flatten(1)
    return (per_sample.sum(1) if reduction == "sum" else per_sample.mean(1)).mean()


class DenoisingStep(TrainingStep):
    """Diffusion training on one network named ``network`` (module docstring).

    Args:
        scheduler: MONAI scheduler with the schedule and ``prediction_type`` (``make_segdiff_scheduler``).
        reduction: ``"sum"`` (SegDiff reference) or ``"mean"`` over each sample's elements.
    """

    loss_keys = ("loss",)

    def __init__(self, scheduler: Scheduler, reduction: str = "sum") -> None:
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.scheduler = scheduler
        self.reduction = reduction
        self.prediction_type = str(getattr(scheduler, "prediction_type", "epsilon"))
        self.num_timesteps = int(scheduler.num_train_timesteps)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, index)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def __call__(self, engine: Any, image: torch.Tensor, label: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        index = torch.randint(0, self.num_timesteps, (label.shape[0],), device=label.device)
        noise = torch.randn_like(label)
        x_t = self.scheduler.add_noise(label, noise, index)
        with engine.autocast():
            prediction = engine.networks["network"](x_t, index, image=image)
        loss = denoising_loss(self.target(label, noise, index), prediction, self.reduction)
        self.update(engine, "network", loss)
        return {"loss": loss.detach()}
