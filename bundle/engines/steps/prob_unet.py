"""The Probabilistic U-Net step: reconstruction from a posterior sample + beta * KL(q || p).

Per batch (METHODS.md section 3): the posterior net sees the image and the label (one annotator, drawn per sample
by ``RandSelectAnnotatord``), z ~ q(z | x, y) is decoded by f_comb, and

    loss = CE_sum / B + beta * mean_b KL(q(z | x_b, y_b) || p(z | x_b))

with CE the binary cross-entropy of the logits summed over pixels and channels (the official code's sum divided by
the batch size) and the analytic KL. The official 1e-5 * sum(w^2) / 2 weight penalty is the optimizer's
``weight_decay`` (Adam's coupled L2 adds exactly that gradient).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bundle.engines.steps.base import TrainingStep, binary_target

__all__ = ["ProbUNetStep"]


class ProbUNetStep(TrainingStep):
    """One ELBO update of the ``ProbabilisticUNet`` named ``network``.

    Args:
        beta: weight of the KL term (1 in the paper; Knegt's script: 10).
    """

    loss_keys = ("loss", "loss_rec", "loss_kl")

    def __init__(self, beta: float = 1.0) -> None:
        self.beta = float(beta)

    def __call__(self, engine: Any, image: torch.Tensor, label: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        target = binary_target(label)
        with engine.autocast():
            logits, kl = engine.networks["network"](image, target, return_kl=True)  # through DDP's forward
        loss_rec = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum") / image.shape[0]
        loss_kl = kl.float().mean()
        loss = loss_rec + self.beta * loss_kl
        self.update(engine, "network", loss)
        return {"loss": loss.detach(), "loss_rec": loss_rec.detach(), "loss_kl": loss_kl.detach()}
