"""The SegDiff training step as a MONAI engine: the eps objective with an EMA of the weights.

Per batch (METHODS.md section 2): draw i ~ U{0 .. T-1} per sample and eps ~ N(0, I), form
x_{i+1} = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps from the label x0 in {-1, 1} (MONAI's ``add_noise``), predict
eps_hat = net(x_{i+1}, i, image) and minimise the per-sample SUM of (eps - eps_hat)^2 over channels and pixels,
averaged over the batch (the reference's ``terms["sum"]``). After each optimiser step the EMA network is updated;
the EMA network is what validation uses and what the checkpointer saves as ``model.pt``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch
from monai.networks.schedulers import Scheduler
from monai.utils import CommonKeys
from torch import nn
from torch.optim import Optimizer

from bundle.engines.ema import ExponentialMovingAverage
from bundle.engines.flags import as_bool

__all__ = ["SegDiffTrainer", "eps_loss", "loss_outputs"]


def loss_outputs(output: dict) -> dict[str, float]:
    """The scalar loss of a ``SegDiffTrainer`` iteration output, for StatsHandler / MLFlowHandler."""
    return {"loss": float(output[CommonKeys.LOSS])}


def eps_loss(eps: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the per-sample sum of squared errors: (B, C, H, W) x 2 -> scalar."""
    if eps.shape != eps_hat.shape:
        raise ValueError(f"predicted noise {tuple(eps_hat.shape)} differs from the noise shape {tuple(eps.shape)}")
    return (eps - eps_hat.float()).pow(2).flatten(1).sum(1).mean()


class SegDiffTrainer(Trainer):
    """Trainer for an eps-predicting conditional diffusion network (SegDiff).

    Args:
        device: training device.
        max_epochs: epochs to train.
        train_data_loader: batches with ``image`` (B, C_img, H, W), normalised, and ``label`` (B, C, H, W) in
            {-1, 1}.
        network: the trained network, ``forward(x_t, t, image=...)`` -> eps (``SegDiffNetwork``), plain or as
            ``prepare_network`` returns it (DDP / ``torch.compile``: DDP averages the gradients over the ranks).
        optimizer: optimiser of ``network`` (AdamW in the reference).
        scheduler: MONAI scheduler holding the schedule (``make_segdiff_scheduler``).
        ema: the EMA of ``network`` (updated after each step); None trains without EMA.
        epoch_length, non_blocking, prepare_batch, iteration_update, postprocessing, key_train_metric,
        additional_metrics, metric_cmp_fn, train_handlers, amp, event_names, event_to_attr, to_kwargs, amp_kwargs:
            as ``monai.engines.SupervisedTrainer``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: Optimizer,
        scheduler: Scheduler,
        ema: ExponentialMovingAverage | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable | None = None,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        extra: dict[str, Any] = {} if metric_cmp_fn is None else {"metric_cmp_fn": metric_cmp_fn}
        super().__init__(
            device=torch.device(device) if isinstance(device, str) else device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            amp=as_bool(amp, "amp"),
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=False,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
            **extra,
        )
        if getattr(scheduler, "prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"SegDiffTrainer trains eps prediction, the scheduler predicts {scheduler.prediction_type!r}")
        if ema is not None and ema.network is not network:
            raise ValueError("the EMA must average the trained network")
        self.network = network
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.ema = ema
        self.num_timesteps = int(scheduler.num_train_timesteps)

    def _autocast(self) -> torch.autocast:
        kwargs = {"dtype": torch.bfloat16, **(self.amp_kwargs or {})}
        return torch.autocast(device_type=self.state.device.type, enabled=self.amp, **kwargs)

    def _iteration(self, engine: SegDiffTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        prepared = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        image, x0 = torch.as_tensor(prepared[0]).float(), torch.as_tensor(prepared[1]).float()
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        index = torch.randint(0, engine.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = engine.scheduler.add_noise(x0, noise, index)
        with engine._autocast():
            eps_hat = engine.network(x_t, index, image=image)
        loss = eps_loss(noise, eps_hat)
        loss.backward()
        engine.optimizer.step()
        if engine.ema is not None:
            engine.ema.update()
        out = {CommonKeys.IMAGE: image, CommonKeys.LABEL: x0, CommonKeys.LOSS: loss.detach()}
        engine.state.output = out
        return out
