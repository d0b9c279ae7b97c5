"""Runtime helpers every layer of the bundle may import: switches, devices, process ranks, seeds, noise rows.

- ``as_bool``: command-line switches (``--amp false`` reaches a config as the *string* "false", which Python
  treats as true; every component that takes a switch reads it through ``as_bool``).
- ``prepare_network`` / ``unwrap_network``: a network on its device with the requested fast paths
  (channels_last, DistributedDataParallel, ``torch.compile``), and the plain module inside those wrappers.
- ``process_rank`` / ``seed_everything``: rank-aware seeding, callable from a bundle's ``run`` section (MONAI
  Label runs only that section).
- ``randn_rows`` / ``rand_rows``: noise with one ``torch.Generator`` per row, so a row (one generation of one
  image) draws the same numbers whether it is computed alone or inside a batch.
- ``handler_list``: the handlers of a config section given as a dict keyed by name (or a list), as a list.

Nothing here imports from the rest of the bundle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from monai.utils import set_determinism
from torch import nn

__all__ = [
    "served_checkpoint",
    "TRUE",
    "FALSE",
    "as_bool",
    "prepare_network",
    "unwrap_network",
    "process_rank",
    "seed_everything",
    "randn_rows",
    "rand_rows",
    "handler_list",
]

TRUE = {"true", "yes", "on", "1"}
FALSE = {"false", "no", "off", "0", "none", ""}


def as_bool(value: object, name: str = "flag") -> bool:
    """``value`` as a bool: bools and numbers as Python does; strings true/yes/on/1 and false/no/off/0/none.

    Raises:
        ValueError: any other value, naming the switch.
    """
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE:
            return True
        if text in FALSE:
            return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def unwrap_network(network: nn.Module) -> nn.Module:
    """The module inside DDP / ``torch.compile`` wrappers (their ``module`` / ``_orig_mod``)."""
    for attr in ("module", "_orig_mod"):
        while hasattr(network, attr) and isinstance(getattr(network, attr), nn.Module):
            network = getattr(network, attr)
    return network


def prepare_network(
    network: nn.Module,
    device: torch.device | str,
    channels_last: bool = False,
    distributed: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Move ``network`` to ``device`` and apply the requested fast paths, in this order:

    - ``channels_last``: NHWC memory format for the weights (faster convolutions on recent GPUs and AMX CPUs);
    - ``distributed``: wrap in ``DistributedDataParallel`` (the process group must exist; one device per process);
    - ``compile``: ``torch.compile`` the result.

    Checkpoints stay plain: ``unwrap_network`` strips the DDP and compile wrappers.
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


def process_rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def seed_everything(seed: int) -> int:
    """Seed Python, NumPy and torch with ``seed + rank``; returns the seed used."""
    used = int(seed) + process_rank()
    set_determinism(seed=used)
    return used


def randn_rows(generators: Sequence[torch.Generator], shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise (len(generators), *shape) with ``like``'s device and dtype; row r from generator r."""
    rows = [torch.randn(tuple(shape), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def rand_rows(generators: Sequence[torch.Generator], shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) noise (len(generators), *shape) like ``randn_rows``."""
    rows = [torch.rand(tuple(shape), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


def handler_list(*groups: Mapping[str, Any] | Sequence[Any] | None) -> list[Any]:
    """The handlers of one or more groups as one list, in order; ``None`` entries (switched-off handlers) dropped.

    A group is a dict keyed by name (how the configs declare handlers, so an overlay or the command line switches
    one off by name: ``--train#handlers#mlflow#_disabled_ true``) or a list (how MONAI Label's exported bundles
    hold them).
    """
    out: list[Any] = []
    for group in groups:
        if group is None:
            continue
        items = group.values() if isinstance(group, Mapping) else group
        out.extend(h for h in items if h is not None)
    return out


def served_checkpoint(trained: str, pretrained: Mapping[str, str] | None = None, method: str | None = None) -> str:
    """The weights inference serves: ``trained`` (the bundle's ``models/model.pt``) when it exists, else the
    dataset's shipped weights for ``method`` (``pretrained[method]``, e.g. the Hippocampus cDAL under
    ``pretrained/``), else ``trained`` again (the checkpoint loader then names the missing file)."""
    import logging
    import os

    if os.path.isfile(trained):
        return trained
    shipped = (pretrained or {}).get(method) if method is not None else None
    if shipped and os.path.isfile(shipped):
        logging.getLogger("bundle").warning(f"{trained} does not exist: serving the shipped {method} weights {shipped}")
        return shipped
    return trained
