"""Reverse-process samplers: the part of a method that turns a trained network into label samples.

A sampler is independent of the ensemble logic: it receives a batch of conditions (one row per generation) and one
``torch.Generator`` per row, so a generation draws the same noise whether it runs alone or inside a batch.
The image-dependent part of the network (the image encoder) is computed once by ``encode`` and reused at every
step; ``sample`` never sees the raw image.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from bundle.diffusion.schedules import posterior_coefficients


def unwrap_network(network: nn.Module) -> nn.Module:
    """The module inside DDP / ``torch.compile`` wrappers (their ``module`` / ``_orig_mod``)."""
    for attr in ("module", "_orig_mod"):
        while hasattr(network, attr) and isinstance(getattr(network, attr), nn.Module):
            network = getattr(network, attr)
    return network


def randn_per_row(generators: Sequence[torch.Generator], shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of shape (len(generators), *shape), row r drawn from ``generators[r]``."""
    rows = [torch.randn(tuple(shape), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


class DiffusionSampler(ABC):
    """Interface shared by the methods' samplers (used by ``EnsembleDiffusionInferer``)."""

    @abstractmethod
    def encode(self, network: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Image conditioning computed once per image: (B, *) from image (B, C_img, H, W)."""

    @abstractmethod
    def sample(
        self,
        network: nn.Module,
        condition: torch.Tensor,
        label_shape: Sequence[int],
        generators: Sequence[torch.Generator],
    ) -> torch.Tensor:
        """Label samples (R, C, H, W) in [-1, 1] for R = len(generators) rows of ``condition``."""


class PosteriorSampler(DiffusionSampler):
    """cDAL sampling: x_T ~ N(0, I); for i = T-1 .. 0: x0_hat = G(x, i, z, features); x ~ q(x_i | x_{i+1}, x0_hat).

    The network must provide ``encode_image(image)`` and ``forward(x_t, t, z, image_features=...)`` and an ``nz``
    attribute (latent size); a fresh z ~ N(0, I_nz) is drawn at every step, as in the reference. The last step
    returns x0_hat exactly (coef_x0 = 1, coef_xt = 0, variance 0).

    Args:
        scheduler: MONAI ``DDPMScheduler`` holding the schedule (see ``make_cdal_scheduler``).
    """

    def __init__(self, scheduler: DDPMScheduler) -> None:
        self.scheduler = scheduler
        self.coefficients = posterior_coefficients(scheduler)
        self.num_timesteps = len(scheduler.betas)

    def encode(self, network: nn.Module, image: torch.Tensor) -> torch.Tensor:
        return unwrap_network(network).encode_image(image)

    def sample(
        self,
        network: nn.Module,
        condition: torch.Tensor,
        label_shape: Sequence[int],
        generators: Sequence[torch.Generator],
    ) -> torch.Tensor:
        nz = int(unwrap_network(network).nz)
        rows = len(generators)
        x = randn_per_row(generators, label_shape, condition)
        c = self.coefficients
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((rows,), i, dtype=torch.long, device=condition.device)
            z = randn_per_row(generators, (nz,), condition)
            x0_hat = network(x, t, z, image_features=condition)
            mean = float(c.coef_x0[i]) * x0_hat + float(c.coef_xt[i]) * x
            if i > 0:
                x = mean + float(c.variance[i]) ** 0.5 * randn_per_row(generators, label_shape, condition)
            else:
                x = mean
        return x
