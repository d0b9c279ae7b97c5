"""The MoSE training step as a MONAI engine: weighted expert samples against all annotators with the OT loss.

Per batch (METHODS.md section 4): the network gives N = K * S weighted samples per image (S latent draws per expert,
weights pi_k / S); :class:`~bundle.engines.mose_loss.MoSEOptimalTransportLoss` couples them with the M annotations
(all annotators of the image, ``annotations`` (B, M, H, W) from ``LoadLIDCd``; a single-annotator dataset falls back
to ``label``) and returns the loss. At the end of every epoch the optional gamma schedule sees the epoch-mean loss.
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.utils import CommonKeys
from torch import nn
from torch.optim import Optimizer

from bundle.engines.mose_loss import GammaPlateauSchedule, MoSEOptimalTransportLoss

__all__ = ["MoSETrainer"]


class MoSETrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration trains a ``MixtureOfStochasticExperts``.

    Args:
        device, max_epochs, train_data_loader, epoch_length, train_handlers, ...: as ``SupervisedTrainer``.
        network: the MoSE network; ``network(image, num_samples, mode="weighted")`` returns probabilities
            (B, N, 1, H, W) and weights (B, N).
        optimizer: its optimizer.
        loss_function: a ``MoSEOptimalTransportLoss``.
        samples_per_expert: S (4 in the reference: N = 16 with 4 experts).
        gamma_schedule: a ``GammaPlateauSchedule`` stepped with the epoch-mean loss (None: gamma stays fixed).
        annotations_key: batch key of all annotations (B, M, H, W) in {0, 1} or {-1, 1}.
        kwargs: further ``SupervisedTrainer`` arguments.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: Optimizer,
        loss_function: MoSEOptimalTransportLoss,
        samples_per_expert: int = 4,
        gamma_schedule: GammaPlateauSchedule | None = None,
        annotations_key: str = "annotations",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(device=torch.device(device) if isinstance(device, str) else device, max_epochs=max_epochs,
                         train_data_loader=train_data_loader, network=network, optimizer=optimizer,
                         loss_function=loss_function, **kwargs)
        if samples_per_expert < 1:
            raise ValueError(f"samples_per_expert must be >= 1, got {samples_per_expert}")
        self.samples_per_expert = int(samples_per_expert)
        self.gamma_schedule = gamma_schedule
        self.annotations_key = annotations_key
        self._epoch_loss = [0.0, 0]
        self.add_event_handler(Events.EPOCH_STARTED, self._reset_epoch_loss)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._step_gamma)

    def _reset_epoch_loss(self, engine: MoSETrainer) -> None:
        self._epoch_loss = [0.0, 0]

    def _step_gamma(self, engine: MoSETrainer) -> None:
        if self.gamma_schedule is not None and self._epoch_loss[1]:
            if self.gamma_schedule.step(self._epoch_loss[0] / self._epoch_loss[1]):
                self.logger.info(f"epoch {engine.state.epoch}: OT gamma -> {self.loss_function.gamma}")

    def _annotations(self, batchdata: dict, label: torch.Tensor) -> torch.Tensor:
        value = batchdata.get(self.annotations_key, label) if isinstance(batchdata, dict) else label
        value = torch.as_tensor(value).to(self.state.device, non_blocking=self.non_blocking)
        if value.ndim != 4:
            raise ValueError(f"annotations must be (B, M, H, W), got shape {tuple(value.shape)}")
        return (value > 0).float()[:, :, None]  # (B, M, 1, H, W)

    def _iteration(self, engine: MoSETrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        image, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking,
                                            **engine.to_kwargs)[:2]
        image = torch.as_tensor(image).float()
        annotations = engine._annotations(batchdata, label)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        num_experts = int(getattr(engine.network, "module", engine.network).num_experts)
        drawn = engine.network(image, num_samples=num_experts * engine.samples_per_expert, mode="weighted")
        terms = engine.loss_function(drawn["probabilities"], drawn["weights"], annotations)
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(
                f"non-finite OT loss at iteration {engine.state.iteration}: training diverged; lower the learning "
                "rate (--lr_g)"
            )
        terms["loss"].backward()
        engine.optimizer.step()
        engine._epoch_loss[0] += float(terms["loss"].detach())
        engine._epoch_loss[1] += 1
        out = {CommonKeys.IMAGE: image, CommonKeys.LABEL: annotations[:, :1, 0], CommonKeys.PRED:
               drawn["probabilities"].detach(), CommonKeys.LOSS: terms["loss"].detach(),
               "loss_seg": terms["loss_seg"], "loss_kl": terms["loss_kl"], "gamma": engine.loss_function.gamma}
        engine.state.output = out
        return out
