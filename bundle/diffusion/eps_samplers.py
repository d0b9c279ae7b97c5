"""Samplers for noise-predicting (eps) networks such as SegDiff: ancestral DDPM and DDIM.

Both follow the ``DiffusionSampler`` interface: ``encode`` runs the network's image encoder once per image and
``sample`` reuses its output at every step; all rows (the generations of one or more images) run as one batch,
and every random draw of row r comes from ``generators[r]``, so a generation is the same whether it is sampled
alone or inside a batch. The maths is that of MONAI's ``DDPMScheduler.step`` / ``DDIMScheduler.step`` (tested to
agree), computed here from the scheduler's ``alphas_cumprod`` so that the noise can be drawn per row.

Index convention (``bundle.diffusion.schedules``): the network called with time index i sees x_{i+1}, whose signal
level is ``abar_i = alphas_cumprod[i]``; the step maps it to the state at index i - 1 (``abar_{-1} = 1``, x_0).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
from monai.networks.schedulers import DDPMScheduler, Scheduler
from torch import nn

from bundle.diffusion.samplers import DiffusionSampler, randn_per_row, unwrap_network

__all__ = [
    "EpsDDPMSampler",
    "EpsDDIMSampler",
    "UncachedImageNetwork",
    "ddim_timesteps",
    "make_eps_sampler",
    "predicted_x0",
]


def predicted_x0(eps: torch.Tensor, x_t: torch.Tensor, alpha_cumprod: float) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (x_t - (1.0 - alpha_cumprod) ** 0.5 * eps) / alpha_cumprod**0.5


def ddim_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """The DDIM time indices, from most to least noisy: round(linspace(T - 1, 0, num_steps)).

    They always start at T - 1 (as the DDPM chain) and end at 0; for T = 100 and 25 steps the spacing is 4 or 5.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if num_steps == 1:
        return [num_train_timesteps - 1]
    steps = torch.linspace(num_train_timesteps - 1, 0, num_steps, dtype=torch.float64).round().long().tolist()
    if len(set(steps)) != len(steps):
        raise ValueError(f"{num_steps} DDIM steps of T = {num_train_timesteps} repeat a time index: {steps}")
    return steps


class _EpsSampler(DiffusionSampler):
    """Shared loop: x ~ N(0, I); for each (i, i_prev): eps = net(x, i, features); x = step(eps, i, i_prev, x)."""

    def __init__(self, scheduler: Scheduler, clip_x0: bool | None = None) -> None:
        prediction = getattr(scheduler, "prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(f"{type(self).__name__} needs an eps-prediction scheduler, got prediction_type={prediction!r}")
        self.scheduler = scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32).cpu()
        self.betas = scheduler.betas.to(torch.float32).cpu()
        self.num_train_timesteps = len(self.betas)
        self.clip_sample = bool(getattr(scheduler, "clip_sample", False)) if clip_x0 is None else bool(clip_x0)
        self.clip_range = tuple(getattr(scheduler, "clip_sample_values", (-1.0, 1.0)))
        self.timesteps: list[int] = list(range(self.num_train_timesteps - 1, -1, -1))

    def _abar(self, index: int) -> float:
        return float(self.alphas_cumprod[index]) if index >= 0 else 1.0

    def _x0(self, eps: torch.Tensor, x_t: torch.Tensor, index: int) -> torch.Tensor:
        x0 = predicted_x0(eps, x_t, self._abar(index))
        return x0.clamp(*self.clip_range) if self.clip_sample else x0

    def encode(self, network: nn.Module, image: torch.Tensor) -> torch.Tensor:
        return unwrap_network(network).encode_image(image)

    @abstractmethod
    def step(
        self, eps: torch.Tensor, index: int, prev_index: int, x_t: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """One reverse step from time index ``index`` to ``prev_index`` (-1: the clean label)."""

    @abstractmethod
    def needs_noise(self, prev_index: int) -> bool:
        """Whether the step towards ``prev_index`` draws fresh noise."""

    def sample(
        self,
        network: nn.Module,
        condition: torch.Tensor,
        label_shape: Sequence[int],
        generators: Sequence[torch.Generator],
    ) -> torch.Tensor:
        """Label samples (R, *label_shape), about [-1, 1], for R = len(generators) rows of image features."""
        rows = len(generators)
        if condition.shape[0] not in (1, rows):
            raise ValueError(f"condition has {condition.shape[0]} rows for {rows} generators")
        x = randn_per_row(generators, label_shape, condition)
        previous = self.timesteps[1:] + [-1]
        for index, prev_index in zip(self.timesteps, previous):
            t = torch.full((rows,), index, dtype=torch.long, device=condition.device)
            eps = network(x, t, image_features=condition).to(x.dtype)
            noise = randn_per_row(generators, label_shape, condition) if self.needs_noise(prev_index) else None
            x = self.step(eps, index, prev_index, x, noise)
        return x


class EpsDDPMSampler(_EpsSampler):
    """Ancestral DDPM over all T steps with the scheduler's variance (SegDiff: ``fixed_large``, sigma^2 = beta_t).

    x_{i} = c0_i x0_hat + ct_i x_{i+1} + sigma_i z, with x0_hat from eps, c0_i = sqrt(abar_{i-1}) beta_i / (1 - abar_i),
    ct_i = sqrt(alpha_i) (1 - abar_{i-1}) / (1 - abar_i), and no noise on the last step (index 0).

    Args:
        scheduler: MONAI ``DDPMScheduler`` with ``prediction_type="epsilon"`` (``make_segdiff_scheduler``).
        clip_x0: clamp x0_hat to [-1, 1] before the step; None follows the scheduler's ``clip_sample`` (False for
            SegDiff, as the reference).
    """

    def __init__(self, scheduler: DDPMScheduler, clip_x0: bool | None = None) -> None:
        super().__init__(scheduler, clip_x0)
        variance_type = getattr(scheduler, "variance_type", "fixed_large")
        if variance_type not in ("fixed_large", "fixed_small"):
            raise ValueError(f"EpsDDPMSampler supports fixed_large/fixed_small variance, got {variance_type!r}")
        self.variance_type = variance_type

    def variance(self, index: int) -> float:
        """sigma_i^2 of the step from time index ``index`` (beta_i, or the posterior variance clipped at 1e-20)."""
        beta = float(self.betas[index])
        if self.variance_type == "fixed_large":
            return beta
        return max((1.0 - self._abar(index - 1)) / (1.0 - self._abar(index)) * beta, 1e-20)

    def needs_noise(self, prev_index: int) -> bool:
        return prev_index >= 0

    def step(
        self, eps: torch.Tensor, index: int, prev_index: int, x_t: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        if prev_index != index - 1:
            raise ValueError(f"DDPM steps go from i to i - 1, got {index} -> {prev_index}")
        abar, abar_prev, beta = self._abar(index), self._abar(index - 1), float(self.betas[index])
        coef_x0 = abar_prev**0.5 * beta / (1.0 - abar)
        coef_xt = (1.0 - beta) ** 0.5 * (1.0 - abar_prev) / (1.0 - abar)
        mean = coef_x0 * self._x0(eps, x_t, index) + coef_xt * x_t
        if index == 0:
            return mean
        if noise is None:
            raise ValueError(f"the DDPM step from time index {index} needs noise")
        return mean + self.variance(index) ** 0.5 * noise


class EpsDDIMSampler(_EpsSampler):
    """DDIM (Song et al. 2021) on ``num_steps`` of the T training steps (``ddim_timesteps``): the fast option.

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - abar_prev) / (1 - abar) (1 - abar / abar_prev)); eta = 0 is deterministic given x_T.

    Args:
        scheduler: MONAI ``DDPMScheduler`` or ``DDIMScheduler`` with ``prediction_type="epsilon"``.
        num_steps: number of network evaluations (<= T).
        eta: noise weight (0: DDIM, 1: DDPM-like variance).
        clip_x0: clamp x0_hat to [-1, 1] (the labels' range) before the step, as improved-diffusion's and
            diffusers' DDIM do by default. With large jumps an unclipped x0_hat (amplified by 1 / sqrt(abar), about
            220 at T = 100) carries its error into the next state; None follows the scheduler's ``clip_sample``.
    """

    def __init__(self, scheduler: Scheduler, num_steps: int = 25, eta: float = 0.0, clip_x0: bool | None = True) -> None:
        super().__init__(scheduler, clip_x0)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.num_steps = int(num_steps)
        self.timesteps = ddim_timesteps(self.num_train_timesteps, self.num_steps)

    def sigma(self, index: int, prev_index: int) -> float:
        abar, abar_prev = self._abar(index), self._abar(prev_index)
        return self.eta * ((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev)) ** 0.5

    def needs_noise(self, prev_index: int) -> bool:
        return self.eta > 0

    def step(
        self, eps: torch.Tensor, index: int, prev_index: int, x_t: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        if not -1 <= prev_index < index:
            raise ValueError(f"DDIM steps go to a smaller time index, got {index} -> {prev_index}")
        abar_prev = self._abar(prev_index)
        sigma = self.sigma(index, prev_index)
        out = abar_prev**0.5 * self._x0(eps, x_t, index) + max(1.0 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            if noise is None:
                raise ValueError(f"the DDIM step from time index {index} with eta > 0 needs noise")
            out = out + sigma * noise
        return out


class UncachedImageNetwork(nn.Module):
    """Adaptor giving the reference codes' loop: the image encoder runs inside every network call.

    ``encode_image`` returns the image itself and ``forward(..., image_features=image)`` calls the wrapped network
    with ``image=image``, so any sampler of this module (or cDAL's ``PosteriorSampler``) run through it recomputes
    the encoder at every step, as SegDiff's and cDAL's reference sampling loops do. Used by the benchmark and the
    tests to compare against the cached path; attributes the samplers read (``label_channels``, ``nz``) are copied.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        inner = unwrap_network(network)
        for name in ("label_channels", "nz"):
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *args, image_features: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.network(x_t, t, *args, image=image_features, **kwargs)


def make_eps_sampler(
    scheduler: Scheduler,
    method: str = "ddpm",
    num_steps: int | None = None,
    eta: float = 0.0,
    clip_x0: bool | None = None,
) -> _EpsSampler:
    """The sampler named by ``method``: ``"ddpm"`` (all T steps, the reference) or ``"ddim"`` (``num_steps``).

    ``num_steps`` and ``eta`` are ignored by DDPM; DDIM defaults to 25 steps. ``clip_x0`` None keeps each sampler's
    default (DDPM: the scheduler's ``clip_sample``, i.e. no clipping for SegDiff; DDIM: clip to [-1, 1]).
    """
    if method == "ddpm":
        return EpsDDPMSampler(scheduler, clip_x0=clip_x0)
    if method == "ddim":
        steps = 25 if num_steps is None else int(num_steps)
        return EpsDDIMSampler(scheduler, num_steps=steps, eta=eta, clip_x0=True if clip_x0 is None else clip_x0)
    raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
