"""Rank-aware seeding, callable from a bundle's ``run`` section (MONAI Label runs only that section)."""

from __future__ import annotations

import torch.distributed as dist
from monai.utils import set_determinism


def process_rank() -> int:
    """This process's rank in the default process group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def seed_everything(seed: int) -> int:
    """Seed Python, NumPy and torch with ``seed + rank``; returns the seed used."""
    used = int(seed) + process_rank()
    set_determinism(seed=used)
    return used
