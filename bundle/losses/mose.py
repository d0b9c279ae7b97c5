"""MoSE's optimal-transport loss between weighted samples and annotations (``utils/OTloss.py`` of MoSE-AUSeg).

For one image with samples s_1..s_N (foreground probabilities, weights w_n = pi_k / S) and annotations y_1..y_M
(weights p_m, uniform):

- cost c_nm = 1 - (I + 1) / (U + 1), the soft IoU of the foreground (I = sum s * y, U = sum s + sum y - I);
- coupling P (no gradient), built greedily: the annotations, in order of their cheapest cost, each send 1/M of mass
  to their cheapest samples, every sample receiving at most ``gamma`` in total; then column m is scaled by M * p_m.
  With gamma = 1 each annotation sends all its mass p_m to its nearest sample;
- loss = sum_nm P * c (summed over n, m; mean over images) + beta * KL_div(log(w + 1e-8), P.sum(-1)), the latter
  with torch's element-wise 'mean' reduction over images and samples, as the reference.

gamma starts at 1/2 and becomes 1 when the epoch-mean training loss has not improved for ``patience`` (10) epochs
(:class:`GammaPlateauSchedule`, the reference's ``m_scheduler``; attached to the trainer as a handler). beta is 1 for four annotators (10 for one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

__all__ = ["soft_iou_cost", "greedy_coupling", "MoSEOptimalTransportLoss", "GammaPlateauSchedule"]


def soft_iou_cost(probabilities: torch.Tensor, annotations: torch.Tensor) -> torch.Tensor:
    """Cost (B, N, M) = 1 - (I + 1) / (U + 1) from probabilities (B, N, C, *spatial) and masks (B, M, C, *spatial).

    With C > 1 foreground channels the cost is averaged over channels (background is never a channel here).
    """
    if probabilities.shape[0] != annotations.shape[0] or probabilities.shape[2:] != annotations.shape[2:]:
        raise ValueError(
            f"probabilities {tuple(probabilities.shape)} and annotations {tuple(annotations.shape)} must be "
            "(B, N, C, ...) and (B, M, C, ...) with equal B, C and spatial size"
        )
    s = probabilities.flatten(3).transpose(1, 2)  # (B, C, N, P)
    y = annotations.to(probabilities.dtype).flatten(3).transpose(1, 2)  # (B, C, M, P)
    inter = s @ y.transpose(2, 3)  # (B, C, N, M)
    union = s.sum(-1)[..., :, None] + y.sum(-1)[..., None, :] - inter
    return (1.0 - (inter + 1.0) / (union + 1.0)).mean(1)


def greedy_coupling(cost: torch.Tensor, annotation_weights: torch.Tensor, gamma: float) -> torch.Tensor:
    """MoSE's greedy transport plan P (B, N, M) for cost (B, N, M) and annotation weights (B, M) (no gradient).

    Row sums (sample masses before the final scaling) never exceed ``gamma``; column m sums to
    ``annotation_weights[:, m]``. Needs N * gamma >= 1 so that every annotation can place its mass.
    """
    b, n, m = cost.shape
    if n * gamma < 1 - 1e-9:
        raise ValueError(f"gamma={gamma} caps {n} samples at {n * gamma:.3f} < 1 of total mass; raise gamma or N")
    c = cost.detach().double().cpu().numpy()
    p_gt = annotation_weights.detach().double().cpu().numpy().reshape(b, m)
    plan = np.zeros((b, n, m))
    if gamma >= 1:
        nearest = c.argmin(axis=1)  # (B, M)
        for i in range(b):
            plan[i, nearest[i], np.arange(m)] = p_gt[i]
    else:
        for i in range(b):
            remaining = np.full(m, 1.0 / m)
            received = np.zeros(n)
            for gt in np.argsort(c[i].min(axis=0), kind="stable"):
                for sample in np.argsort(c[i, :, gt], kind="stable"):
                    room = gamma - received[sample]
                    if room <= 1e-12:
                        continue
                    moved = min(room, remaining[gt])
                    plan[i, sample, gt] = moved
                    received[sample] += moved
                    remaining[gt] -= moved
                    if remaining[gt] <= 1e-12:
                        break
            plan[i] *= (p_gt[i] * m)[None, :]
    return torch.from_numpy(plan).to(device=cost.device, dtype=cost.dtype)


class MoSEOptimalTransportLoss:
    """Callable loss; ``gamma`` is read at every call (set by :class:`GammaPlateauSchedule`).

    Args:
        beta: weight of the KL term between the sample weights and the coupling's sample marginals.
        gamma: initial mass cap per sample (1/2).
    """

    def __init__(self, beta: float = 1.0, gamma: float = 0.5) -> None:
        self.beta = float(beta)
        self.gamma = float(gamma)

    def __call__(
        self,
        probabilities: torch.Tensor,
        weights: torch.Tensor,
        annotations: torch.Tensor,
        annotation_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms from probabilities (B, N, C, H, W), weights (B, N), annotations (B, M, C, H, W) in {0, 1}.

        Returns ``{"loss", "loss_seg", "loss_kl"}`` (scalars; ``loss`` carries the gradient).
        """
        b, m = annotations.shape[:2]
        if annotation_weights is None:
            annotation_weights = torch.full((b, m), 1.0 / m, device=weights.device)
        cost = soft_iou_cost(probabilities.float(), annotations)
        plan = greedy_coupling(cost, annotation_weights, self.gamma)
        loss_seg = (plan * cost).sum(dim=(1, 2)).mean()
        target = plan.sum(-1).float()
        # F.kl_div(log(w + 1e-8), target) with its element-wise 'mean' reduction, as the reference
        loss_kl = (torch.xlogy(target, target) - target * torch.log(weights.float() + 1e-8)).mean()
        return {"loss": loss_seg + self.beta * loss_kl, "loss_seg": loss_seg.detach(), "loss_kl": loss_kl.detach()}


class GammaPlateauSchedule:
    """Raise the loss's ``gamma`` to the next of ``values`` when a monitored value stops improving.

    ``step(value)`` once per epoch (the epoch-mean training loss): after more than ``patience`` epochs without a new
    minimum, gamma moves to the next value and the count restarts. ``state_dict``/``load_state_dict`` make it part of
    a resumable checkpoint.

    Args:
        loss: the :class:`MoSEOptimalTransportLoss` whose ``gamma`` is scheduled.
        values: the gamma values to step through ((1.0,) in the reference).
        patience: epochs without improvement tolerated (10).
    """

    def __init__(self, loss: MoSEOptimalTransportLoss, values: Sequence[float] = (1.0,), patience: int = 10) -> None:
        self.loss = loss
        self.values = [float(v) for v in values]
        self.patience = int(patience)
        self.best = math.inf
        self.bad_epochs = 0
        self.index = 0
        self._epoch = [0.0, 0]

    def step(self, value: float) -> bool:
        """Record one epoch's value; returns True when gamma changed."""
        if self.index >= len(self.values):
            return False
        if value < self.best:
            self.best, self.bad_epochs = float(value), 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.loss.gamma = self.values[self.index]
            self.index += 1
            self.best, self.bad_epochs = math.inf, 0
            return True
        return False

    def attach(self, engine: Engine) -> None:
        """As a trainer handler: accumulate the iterations' ``loss`` and ``step`` with the epoch mean."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _reset(self, engine: Engine) -> None:
        self._epoch = [0.0, 0]

    def _accumulate(self, engine: Engine) -> None:
        self._epoch[0] += float(engine.state.output["losses"]["loss"])
        self._epoch[1] += 1

    def _epoch_completed(self, engine: Engine) -> None:
        if self._epoch[1] and self.step(self._epoch[0] / self._epoch[1]):
            engine.logger.info(f"epoch {engine.state.epoch}: OT gamma -> {self.loss.gamma}")

    def state_dict(self) -> dict[str, float | int]:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "index": self.index, "gamma": self.loss.gamma}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])
        self.index, self.loss.gamma = int(state["index"]), float(state["gamma"])
