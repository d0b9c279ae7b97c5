"""The one training engine of the bundle: a MONAI ``Trainer`` that runs a method's training step.

A method is a set of named networks and optimizers plus a :class:`~bundle.engines.steps.base.TrainingStep` that
updates them from one batch (cDAL: a discriminator and a generator update; SegDiff: one eps-prediction update;
the U-Net, the Probabilistic U-Net and MoSE: one supervised update). What every method shares is written once,
here:

- batch preparation: ``prepare_batch`` gives (image, label) on the device as float (the Hippocampus overlay
  turns 3-D crops into a batch of axial slices with ``bundle.transforms.volume.prepare_slice_batch``);
- the networks are put in training mode before the step;
- mixed precision: ``amp`` makes ``engine.autocast()`` a bf16 autocast region (``amp_kwargs`` may name another
  dtype) that the steps put around their network forwards;
- the losses: the step returns a dict with exactly its ``loss_keys``; a non-finite value stops the run with the
  iteration and the loss named; ``engine.state.output["losses"]`` holds them as floats for the StatsHandler and
  MLflow (``loss_values``), ``engine.state.output["loss"]`` the first one;
- EMA, learning-rate schedules, checkpoints, validation and logging are handlers (``bundle.handlers``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from monai.engines import Trainer
from monai.engines.utils import default_prepare_batch
from monai.utils import CommonKeys
from torch import nn
from torch.optim import Optimizer

from bundle.engines.steps.base import TrainingStep
from bundle.runtime import as_bool

__all__ = ["SegmentationTrainer", "loss_values"]


def loss_values(output: Mapping[str, Any]) -> dict[str, float]:
    """The named scalar losses of a ``SegmentationTrainer`` iteration, for StatsHandler / MLFlowHandler."""
    return dict(output["losses"])


class SegmentationTrainer(Trainer):
    """Trainer running ``step`` on every batch (module docstring).

    Args:
        device: training device.
        max_epochs: epochs to train.
        train_data_loader: batches with ``image`` (B, C_img, *spatial), normalised, and ``label``
            (B, C, *spatial) in {-1, 1} (the bundle's label convention); extra keys (e.g. ``annotations``) reach the
            step in ``batch``.
        step: the method's training step.
        networks: the trained networks by name (the step's ``network_names`` must be among them).
        optimizers: their optimizers by name (the step's ``optimizer_names``).
        epoch_length: iterations per epoch (None: one pass over the loader).
        non_blocking, prepare_batch, iteration_update, postprocessing, key_train_metric, additional_metrics,
        metric_cmp_fn, event_names, event_to_attr, to_kwargs: as ``monai.engines.SupervisedTrainer``.
        train_handlers: handlers to attach (a list; ``bundle.runtime.handler_list`` makes one from the configs'
            dicts).
        amp: bf16 autocast of the network forwards inside the step.
        amp_kwargs: ``torch.autocast`` arguments (e.g. ``{"dtype": torch.float16}``).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        step: TrainingStep,
        networks: Mapping[str, nn.Module],
        optimizers: Mapping[str, Optimizer],
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
        self.step = step
        self.networks = dict(networks)
        self.optimizers = dict(optimizers)
        missing = [n for n in step.network_names if n not in self.networks]
        missing += [f"optimizer {n}" for n in step.optimizer_names if n not in self.optimizers]
        if missing:
            raise ValueError(
                f"{type(step).__name__} needs {', '.join(missing)}; the config gives networks {sorted(self.networks)} "
                f"and optimizers {sorted(self.optimizers)} (the method overlay's `networks` / `optimizers`)"
            )
        # ``network``/``optimizer`` are the names MONAI handlers look for
        self.network = self.networks[step.network_names[0]]
        self.optimizer = self.optimizers[step.optimizer_names[0]] if step.optimizer_names else None
        step.attach(self)

    def autocast(self) -> AbstractContextManager:
        """The mixed-precision region of the network forwards: bf16 when ``amp`` is on, else a no-op."""
        kwargs = {"dtype": torch.bfloat16, **(self.amp_kwargs or {})}
        return torch.autocast(device_type=self.state.device.type, enabled=self.amp, **kwargs)

    def _iteration(self, engine: SegmentationTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        prepared = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        image, label = torch.as_tensor(prepared[0]).float(), torch.as_tensor(prepared[1]).float()
        for network in engine.networks.values():
            network.train()
        losses = engine.step(engine, image, label, batchdata)
        if set(losses) != set(engine.step.loss_keys):
            raise KeyError(
                f"{type(engine.step).__name__} returned losses {sorted(losses)}, declared {list(engine.step.loss_keys)}"
            )
        values = {k: float(losses[k]) for k in engine.step.loss_keys}
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(
                f"non-finite {', '.join(bad)} at iteration {engine.state.iteration}: training diverged and stopped; "
                "the last checkpoint is the last good epoch (lower the learning rate, check the inputs' intensities)"
            )
        out = {
            CommonKeys.IMAGE: image,
            CommonKeys.LABEL: label,
            CommonKeys.LOSS: losses[engine.step.loss_keys[0]],
            "losses": values,
        }
        engine.state.output = out
        return out
