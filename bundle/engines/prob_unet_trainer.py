"""The Probabilistic U-Net training step as a MONAI engine: reconstruction from a posterior sample + beta * KL.

Per batch (METHODS.md section 3): the posterior net sees the image and the label (one annotator, drawn per sample by
``RandSelectAnnotatord``), z ~ q(z | x, y) is decoded by f_comb, and

    loss = CE_sum / B + beta * mean_b KL(q(z | x_b, y_b) || p(z | x_b))

with CE the binary cross-entropy of the logits summed over pixels and channels (the official code's sum divided by
the batch size) and the analytic KL. The official 1e-5 * sum(w^2) / 2 weight penalty is the optimizer's
``weight_decay`` (Adam's coupled L2 adds exactly that gradient).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import SupervisedTrainer
from monai.utils import CommonKeys
from torch import nn
from torch.optim import Optimizer

from bundle.engines.binary_targets import binary_target

__all__ = ["ProbUNetTrainer"]


class ProbUNetTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration trains a ``ProbabilisticUNet``.

    Args:
        device, max_epochs, train_data_loader, epoch_length, train_handlers, ...: as ``SupervisedTrainer``
            (batches with ``image`` (B, C_img, H, W) and ``label`` (B, C, H, W) in {0, 1} or {-1, 1}).
        network: the ``ProbabilisticUNet``.
        optimizer: its optimizer.
        beta: weight of the KL term (1 in the paper; Knegt's script: 10).
        kwargs: further ``SupervisedTrainer`` arguments.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: Optimizer,
        beta: float = 1.0,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(device=torch.device(device) if isinstance(device, str) else device, max_epochs=max_epochs,
                         train_data_loader=train_data_loader, network=network, optimizer=optimizer,
                         loss_function=nn.BCEWithLogitsLoss(reduction="sum"), **kwargs)
        self.beta = float(beta)

    def _iteration(self, engine: ProbUNetTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        image, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking,
                                            **engine.to_kwargs)[:2]
        image, target = torch.as_tensor(image).float(), binary_target(label)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        logits, kl = engine.network(image, target, return_kl=True)  # through DDP's forward when wrapped
        if not (torch.isfinite(logits).all() and torch.isfinite(kl).all()):
            raise FloatingPointError(
                f"non-finite logits or KL at iteration {engine.state.iteration}: training diverged; lower the "
                "learning rate (--lr_g)"
            )
        loss_rec = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / image.shape[0]
        loss_kl = kl.mean()
        loss = loss_rec + engine.beta * loss_kl
        loss.backward()
        engine.optimizer.step()
        out = {CommonKeys.IMAGE: image, CommonKeys.LABEL: target, CommonKeys.PRED: logits.detach(),
               CommonKeys.LOSS: loss.detach(), "loss_rec": loss_rec.detach(), "loss_kl": loss_kl.detach()}
        engine.state.output = out
        return out
