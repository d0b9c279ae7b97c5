"""Exponential moving average (EMA) of a network's weights, as a trainer handler any method can switch on.

With ``ema_decay`` set in the configs, the optimiser trains ``train_network`` (put on its device by
``prepare_network``, so it may be wrapped in ``DistributedDataParallel`` and/or ``torch.compile``) and the
bundle's ``network`` (validated, saved as ``models/model.pt``, loaded by evaluate/inference) is
``averaged_copy(train_network)``, a plain module holding the EMA weights. After every iteration
``ema <- decay * ema + (1 - decay) * trained`` for the parameters (``torch.optim.swa_utils.get_ema_multi_avg_fn``,
the update of ``AveragedModel``), and the buffers are copied. Both networks start equal, as in improved-diffusion:
the EMA takes the trained network's weights when it is built, which under DDP are rank 0's (DDP broadcasts them
when it wraps the network), so every rank holds the same EMA. SegDiff uses it (0.9999 in the reference); the
reference cDAL evaluates an EMA of its generator on Hippocampus (0.999).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from bundle.runtime import unwrap_network

__all__ = ["ExponentialMovingAverage", "averaged_copy"]


def averaged_copy(network: nn.Module) -> nn.Module:
    """A plain deep copy of ``network`` (unwrapped from DDP / compile; same weights and device), gradients off,
    in evaluation mode: the network that holds the EMA."""
    return copy.deepcopy(unwrap_network(network)).requires_grad_(False).eval()


class ExponentialMovingAverage:
    """EMA of ``network``'s parameters in ``ema_network``: a trainer handler (``update()`` after every iteration).

    Args:
        network: the trained network, plain or wrapped in DDP / ``torch.compile`` (the average reads the module
            inside, ``unwrap_network(network)``).
        ema_network: a plain network of the same architecture receiving the average (gradients are disabled on
            it).
        decay: EMA decay in [0, 1] (SegDiff: 0.9999); 0 makes the EMA a copy of the latest weights.
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at update n (TensorFlow's ``num_updates`` rule), so the
            average spans about the last tenth of the iterations early on instead of holding the initial weights
            for ~1 / (1 - decay) iterations; a short CPU run then validates a trained EMA from its first
            validation.
        start_equal: copy ``network``'s parameters and buffers into ``ema_network`` now. Under DDP this makes
            every rank's EMA start from the same (rank 0's) weights even where the ranks built their networks
            from different seeds. A resumed run then loads both networks from the checkpoint.

    ``state_dict()`` holds the number of updates, so a resumed run continues the count (the weights themselves are
    saved with the networks).
    """

    def __init__(
        self,
        network: nn.Module,
        ema_network: nn.Module,
        decay: float = 0.9999,
        start_equal: bool = True,
        warmup: bool = False,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        module = unwrap_network(network)
        source = dict(module.named_parameters())
        target = dict(ema_network.named_parameters())
        if source.keys() != target.keys() or any(source[k].shape != target[k].shape for k in source):
            raise ValueError("the EMA network must have the same parameters (names and shapes) as the trained network")
        if any(p is target[k] for k, p in source.items()):
            raise ValueError("the EMA network shares parameters with the trained network; pass a copy")
        self.network = network
        self.module = module
        self.ema_network = ema_network.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        if start_equal:
            self.copy_weights()

    @torch.no_grad()
    def copy_weights(self) -> None:
        """Set the EMA network's parameters and buffers to the trained network's."""
        for ema_tensor, tensor in zip(self.ema_network.parameters(), self.module.parameters()):
            ema_tensor.copy_(tensor)
        self._copy_buffers()

    @torch.no_grad()
    def _copy_buffers(self) -> None:
        for ema_buffer, buffer in zip(self.ema_network.buffers(), self.module.buffers()):
            ema_buffer.copy_(buffer)

    def current_decay(self) -> float:
        """The decay of the next update: ``decay``, or its warm-up value (class docstring)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move the EMA parameters towards the trained ones and copy the buffers (e.g. norm statistics)."""
        ema_params = list(self.ema_network.parameters())
        if ema_params:
            params = [p.detach().to(e.device) for p, e in zip(self.module.parameters(), ema_params)]
            get_ema_multi_avg_fn(self.current_decay())(ema_params, params, self.num_updates)
        self._copy_buffers()
        self.num_updates += 1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda _: self.update())

    def state_dict(self) -> dict[str, int | float]:
        return {"num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: Mapping[str, int | float]) -> None:
        self.num_updates = int(state["num_updates"])
