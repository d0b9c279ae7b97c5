"""cDAL's noise schedule registered with MONAI's scheduler store, and the forward process for its training step.

Index convention (shared with MONAI's ``DDPMScheduler``): the scheduler holds ``betas[i] = beta_{i+1}`` for
``i = 0 .. T-1``; ``alphas_cumprod[i]`` is the signal level of the noisy label ``x_{i+1}``. A network called with
time index ``i`` sees ``x_{i+1}`` and its sampling step maps ``x_{i+1} -> x_i`` (``x_0`` is the clean label).

``vp_discrete`` is the schedule of the cDAL/DDGAN reference code (``get_sigma_schedule`` with
``use_geometric=False``): ``t_k = eps + (1 - eps) k / T``, ``alpha_bar_c(t) = exp(-t^2 (b_max - b_min) / 2 - t b_min)``
and ``beta_k = 1 - alpha_bar_c(t_k) / alpha_bar_c(t_{k-1})``, computed in float64 and stored as float32.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDPMScheduler
from monai.networks.schedulers.scheduler import NoiseSchedules

from bundle.diffusion.reverse_step import ReverseStep

VP_DISCRETE = "vp_discrete"


def _vp_continuous_alpha_bar(t: torch.Tensor, beta_min: float, beta_max: float) -> torch.Tensor:
    return torch.exp(-0.5 * t**2 * (beta_max - beta_min) - t * beta_min)


@NoiseSchedules.add_def(VP_DISCRETE, "Discretised VP-SDE schedule of DDGAN/cDAL (few steps, T = 2-4)")
def vp_discrete_betas(
    num_train_timesteps: int, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3
) -> torch.Tensor:
    """Betas ``beta_1 .. beta_T`` of the discretised VP-SDE, float32, shape (T,).

    Args:
        num_train_timesteps: T, the number of diffusion steps (cDAL uses 2 to 4).
        beta_min: beta_min of the VP-SDE (0.1 in the reference).
        beta_max: beta_max of the VP-SDE (20 in the reference).
        eps: the smallest continuous time t_0 (1e-3 in the reference).
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    k = torch.arange(num_train_timesteps + 1, dtype=torch.float64)
    t = eps + (1.0 - eps) * k / num_train_timesteps
    alpha_bar = _vp_continuous_alpha_bar(t, beta_min, beta_max)
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.to(torch.float32)


def make_cdal_scheduler(num_timesteps: int = 4, beta_min: float = 0.1, beta_max: float = 20.0) -> DDPMScheduler:
    """MONAI ``DDPMScheduler`` holding the cDAL schedule, x0-prediction and the posterior variance.

    ``step(x0_hat, i, x)`` of this scheduler is the cDAL sampling step (coef1 x0_hat + coef2 x + sqrt(var) eps).
    """
    return DDPMScheduler(
        num_train_timesteps=num_timesteps,
        schedule=VP_DISCRETE,
        variance_type="fixed_small",
        prediction_type="sample",
        clip_sample=False,
        beta_min=beta_min,
        beta_max=beta_max,
    )


def _gather(values: torch.Tensor, index: torch.Tensor, ndim: int, like: torch.Tensor) -> torch.Tensor:
    out = values.to(device=like.device, dtype=like.dtype)[index.to(like.device)]
    return out.reshape(-1, *([1] * (ndim - 1)))


class ForwardDiffusion:
    """The forward process of a scheduler with per-sample time indices, for the cDAL training step.

    ``pair(x0, i)`` gives the consecutive pair (x_i, x_{i+1}) that the cDAL discriminator sees (x_0 is the clean
    label); ``posterior_sample(x0_hat, x_next, i, noise)`` draws x_i ~ q(x_i | x_{i+1}, x0_hat), which is the
    ancestral ``ReverseStep`` of the (fixed_small) scheduler with one time index per sample.
    """

    def __init__(self, scheduler: DDPMScheduler) -> None:
        self.scheduler = scheduler
        self.betas = scheduler.betas.to(torch.float32)
        self.num_timesteps = len(self.betas)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.reverse = ReverseStep(scheduler)

    def pair(self, x0: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_i, x_{i+1}) for per-sample i in [0, T-1]; x_i is x0 itself where i == 0."""
        abar_prev = torch.cat([torch.ones(1), self.alphas_cumprod[:-1]])
        a = _gather(abar_prev, index, x0.ndim, x0)
        x_i = a.sqrt() * x0 + (1.0 - a).sqrt() * torch.randn_like(x0)
        beta = _gather(self.betas, index, x0.ndim, x0)
        x_next = (1.0 - beta).sqrt() * x_i + beta.sqrt() * torch.randn_like(x0)
        return x_i, x_next

    def posterior_sample(
        self, x0_hat: torch.Tensor, x_next: torch.Tensor, index: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A draw of x_i ~ q(x_i | x_{i+1}, x0_hat) for per-sample indices i (B,); no noise where i == 0."""
        noise = torch.randn_like(x0_hat) if noise is None else noise
        return self.reverse(x0_hat, index, index - 1, x_next, noise)
