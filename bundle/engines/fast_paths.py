"""Putting a network on its device: channels_last, DistributedDataParallel and torch.compile, from config flags."""

from __future__ import annotations

import torch
from torch import nn

from bundle.engines.flags import as_bool


def prepare_network(
    network: nn.Module,
    device: torch.device | str,
    channels_last: bool = False,
    distributed: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Move ``network`` to ``device`` and apply the requested fast paths, in this order:

    - ``channels_last``: NHWC memory format for the weights (faster convolutions on recent GPUs);
    - ``distributed``: wrap in ``DistributedDataParallel`` (the process group must exist; one device per process);
    - ``compile``: ``torch.compile`` the result.

    Checkpoints stay plain: ``bundle.diffusion.samplers.unwrap_network`` strips the DDP and compile wrappers.
    """
    channels_last = as_bool(channels_last, "channels_last")
    distributed, compile = as_bool(distributed, "distributed"), as_bool(compile, "compile")
    device = torch.device(device)
    network = network.to(device)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    if distributed:
        device_ids = [device] if device.type == "cuda" else None
        network = nn.parallel.DistributedDataParallel(network, device_ids=device_ids)
    if compile:
        network = torch.compile(network)
    return network
