"""The cDAL training step: one discriminator and one generator update per batch.

D step (METHODS.md 1.2): draw i ~ U{0..T-1} and the pair (x_i, x_{i+1}) from the label x0 in {-1, 1};
real loss softplus(-D(x_i, i, x_{i+1})) plus the R1 penalty (gamma / 2) E||grad_{x_i} D||^2 every ``lazy_reg``
iterations (not rescaled, as the reference); fake loss softplus(D(x_pos, i, x_{i+1})) with
x_pos ~ q(x_i | x_{i+1}, G(x_{i+1}, i, z, I)).

G step: D frozen; a new i and pair; the attention map A is the channel mean of D's feature map
``attention_scale``, bilinearly upsampled, signed and not normalised; A * x0 is re-diffused to x~_{i+1} and the
loss is mean((x0 - G(x~_{i+1}, i, z, I))^2). The reference has no adversarial generator term.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler

from bundle.diffusion.cdal_schedule import ForwardDiffusion
from bundle.engines.steps.base import TrainingStep
from bundle.runtime import unwrap_network

__all__ = ["CDALStep", "attention_map"]


def attention_map(features: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Spatial attention (B, 1, *size) from a discriminator feature map (B, K, h, w) or (B, K, h, w, d): the
    channel mean, bilinearly (trilinearly for 3-D networks) upsampled."""
    mode = "bilinear" if features.ndim == 4 else "trilinear"
    return F.interpolate(features.mean(dim=1, keepdim=True), size=tuple(size), mode=mode, align_corners=False)


class CDALStep(TrainingStep):
    """cDAL's adversarial-attention update of the networks ``generator`` and ``discriminator``.

    Args:
        scheduler: MONAI ``DDPMScheduler`` with the cDAL schedule (``make_cdal_scheduler``).
        attention_scale: index into ``discriminator.get_features`` used for the attention map (3 for MoNuSeg).
        r1_gamma: R1 weight gamma.
        lazy_reg: apply R1 every ``lazy_reg`` iterations (1: every iteration).
    """

    network_names = ("generator", "discriminator")
    optimizer_names = ("generator", "discriminator")
    loss_keys = ("loss_g", "loss_d", "loss_d_real", "loss_d_fake", "r1")

    def __init__(
        self, scheduler: DDPMScheduler, attention_scale: int = 3, r1_gamma: float = 1.0, lazy_reg: int = 10
    ) -> None:
        if lazy_reg < 1:
            raise ValueError(f"lazy_reg must be >= 1, got {lazy_reg}")
        self.diffusion = ForwardDiffusion(scheduler)
        self.attention_scale = int(attention_scale)
        self.r1_gamma = float(r1_gamma)
        self.lazy_reg = int(lazy_reg)

    def _index(self, x0: torch.Tensor) -> torch.Tensor:
        return torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device)

    @staticmethod
    def _latent(generator: torch.nn.Module, x0: torch.Tensor) -> torch.Tensor:
        return torch.randn(x0.shape[0], int(unwrap_network(generator).nz), device=x0.device)

    def discriminator_update(self, engine: Any, image: torch.Tensor, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        gen, disc = engine.networks["generator"], engine.networks["discriminator"]
        disc.requires_grad_(True)
        index = self._index(x0)
        x_t, x_next = self.diffusion.pair(x0, index)
        x_t.requires_grad_(True)
        with engine.autocast():
            d_real = disc(x_t, index, x_next).view(-1)
            loss_real = F.softplus(-d_real.float()).mean()
        r1 = torch.zeros((), device=x0.device)
        if engine.state.iteration % self.lazy_reg == 0:
            (grad,) = torch.autograd.grad(d_real.float().sum(), x_t, create_graph=True)
            r1 = self.r1_gamma / 2 * grad.flatten(1).pow(2).sum(1).mean()
        with torch.no_grad():
            with engine.autocast():
                x0_hat = gen(x_next, index, self._latent(gen, x0), image=image)
            x_pos = self.diffusion.posterior_sample(x0_hat.float(), x_next, index)
        with engine.autocast():
            loss_fake = F.softplus(disc(x_pos, index, x_next).float()).mean()
        loss_d = loss_real + loss_fake + r1
        self.update(engine, "discriminator", loss_d)
        return {
            "loss_d": loss_d.detach(),
            "loss_d_real": loss_real.detach(),
            "loss_d_fake": loss_fake.detach(),
            "r1": r1.detach(),
        }

    def generator_update(self, engine: Any, image: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        gen, disc = engine.networks["generator"], engine.networks["discriminator"]
        disc.requires_grad_(False)
        index = self._index(x0)
        x_t, x_next = self.diffusion.pair(x0, index)
        with torch.no_grad():
            features = unwrap_network(disc).get_features(x_t, index, x_next)[self.attention_scale]
            attention = attention_map(features.float(), x0.shape[2:])
            _, x_next_att = self.diffusion.pair(attention * x0, index)
        with engine.autocast():
            x0_hat = gen(x_next_att, index, self._latent(gen, x0), image=image)
        loss_g = (x0 - x0_hat.float()).pow(2).flatten(1).mean(1).mean()
        self.update(engine, "generator", loss_g)
        return loss_g.detach()

    def __call__(self, engine: Any, image: torch.Tensor, label: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        losses = self.discriminator_update(engine, image, label)
        losses["loss_g"] = self.generator_update(engine, image, label)
        return losses
