"""The MoSE step: weighted expert samples against all annotators with the optimal-transport loss.

Per batch (METHODS.md section 4): the network gives N = K * S weighted samples per image (S latent draws per expert,
weights pi_k / S); ``bundle.losses.mose.MoSEOptimalTransportLoss`` couples them with the M annotations (all
annotators of the image, ``annotations`` (B, M, H, W) from ``LoadLIDCd``; a dataset with one annotation per image
uses its ``label`` (B, C, H, W) as M = 1) and returns the loss. The gamma schedule of the loss is a handler
(``bundle.losses.mose.GammaPlateauSchedule``) that reads the epoch-mean loss.
"""

from __future__ import annotations

from typing import Any

import torch

from bundle.engines.steps.base import TrainingStep
from bundle.losses.mose import MoSEOptimalTransportLoss
from bundle.runtime import unwrap_network

__all__ = ["MoSEStep"]


class MoSEStep(TrainingStep):
    """One OT-loss update of the ``MixtureOfStochasticExperts`` named ``network``.

    Args:
        loss_function: the ``MoSEOptimalTransportLoss``.
        samples_per_expert: S (4 in the reference: N = 16 with 4 experts).
        annotations_key: batch key of all annotations (B, M, H, W) in {0, 1} or {-1, 1}.
    """

    loss_keys = ("loss", "loss_seg", "loss_kl")

    def __init__(
        self, loss_function: MoSEOptimalTransportLoss, samples_per_expert: int = 4, annotations_key: str = "annotations"
    ) -> None:
        if samples_per_expert < 1:
            raise ValueError(f"samples_per_expert must be >= 1, got {samples_per_expert}")
        self.loss_function = loss_function
        self.samples_per_expert = int(samples_per_expert)
        self.annotations_key = annotations_key

    def annotations(self, batch: dict, label: torch.Tensor) -> torch.Tensor:
        """(B, M, C, *spatial) in {0, 1}: the batch's annotator masks (C = 1), else the label as one annotation."""
        value = batch.get(self.annotations_key) if isinstance(batch, dict) else None
        if value is None:
            return (label > 0).float()[:, None]
        value = torch.as_tensor(value).to(label.device)
        if value.ndim != label.ndim:
            raise ValueError(
                f"annotations must be (B, M, *spatial) like the label {tuple(label.shape)}, got {tuple(value.shape)}"
            )
        return (value > 0).float()[:, :, None]

    def __call__(self, engine: Any, image: torch.Tensor, label: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        network = engine.networks["network"]
        num_generations = int(unwrap_network(network).num_experts) * self.samples_per_expert
        with engine.autocast():
            drawn = network(image, num_generations=num_generations, mode="weighted")
        terms = self.loss_function(
            drawn["probabilities"].float(), drawn["weights"].float(), self.annotations(batch, label)
        )
        self.update(engine, "network", terms["loss"])
        return {
            "loss": terms["loss"].detach(),
            "loss_seg": terms["loss_seg"].detach(),
            "loss_kl": terms["loss_kl"].detach(),
        }
