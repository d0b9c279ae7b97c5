"""The diffusion sampler: one reverse chain for every diffusion method, driven by its scheduler.

``DiffusionSampler`` follows the ensemble inferer's ``Sampler`` interface: ``encode`` runs the network's image
encoder once per image (``network.encode_image``) and ``sample`` reuses it at every step; all rows (the generations
of one or more images) run as one batch, and every random draw of row r (x_T, the latent z of networks that take
one, the step noise) comes from ``generators[r]``. Each step is ``bundle.diffusion.reverse_step.ReverseStep``:

- cDAL: x0 prediction, ``fixed_small`` variance, all T steps -> the posterior step of the reference;
- SegDiff: eps prediction, ``fixed_large`` variance, all T steps -> ancestral DDPM (the reference), or
  ``num_steps`` DDIM steps with ``eta`` (the fast option).

Networks: ``forward(x_t, t, image_features=...)``, or ``forward(x_t, t, z, image_features=...)`` for networks with
a latent input, which declare its size as the attribute ``nz`` (cDAL: a fresh z ~ N(0, I) at every step, as the
reference). Samples in [-1, 1] are returned as foreground probabilities clamp((x + 1) / 2, 0, 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.networks.schedulers import Scheduler
from torch import nn

from bundle.diffusion.reverse_step import ReverseStep, spaced_timesteps
from bundle.inferers.samplers import Sampler, SampleRows
from bundle.runtime import randn_rows, unwrap_network

__all__ = ["DiffusionSampler", "UncachedImageNetwork", "latent_size", "make_sampler", "samples_to_probability"]

SAMPLING_METHODS = ("ancestral", "ddpm", "ddim")


def samples_to_probability(samples: torch.Tensor) -> torch.Tensor:
    """Label samples in [-1, 1] as foreground probabilities: clamp((x + 1) / 2, 0, 1)."""
    return ((samples + 1.0) / 2.0).clamp(0.0, 1.0)


class DiffusionSampler(Sampler):
    """Reverse diffusion from x_T ~ N(0, I) with ``ReverseStep`` (module docstring).

    Args:
        scheduler: MONAI scheduler holding the schedule, prediction type and variance type
            (``make_cdal_scheduler``, ``make_segdiff_scheduler``).
        num_steps: network evaluations per sample; None: all T (ancestral chains). Fewer need ``eta`` (DDIM).
        eta: None for the ancestral step; a number for DDIM (0 deterministic, 1 the posterior variance).
        clip_x0: clamp x0_hat to [-1, 1] before each step; None follows the scheduler's ``clip_sample``.
    """

    def __init__(
        self, scheduler: Scheduler, num_steps: int | None = None, eta: float | None = None, clip_x0: bool | None = None
    ) -> None:
        self.scheduler = scheduler
        self.step = ReverseStep(scheduler, eta=eta, clip_x0=clip_x0)
        self.num_train_timesteps = self.step.num_train_timesteps
        self.timesteps = spaced_timesteps(self.num_train_timesteps, num_steps)
        if eta is None and len(self.timesteps) != self.num_train_timesteps:
            raise ValueError(f"{num_steps} of {self.num_train_timesteps} steps needs DDIM: give eta (0 to 1)")
        for index, prev_index in zip(self.timesteps, self.timesteps[1:] + [-1]):
            self.step.scalars(index, prev_index)  # the chain's schedule terms as floats, before any tracing

    @property
    def sampling_steps(self) -> int:
        return len(self.timesteps)

    def encode(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        encoder = network if hasattr(network, "encode_image") else unwrap_network(network)
        return encoder.encode_image(images)

    def sample(
        self,
        network: nn.Module,
        condition: torch.Tensor,
        label_shape: Sequence[int],
        generators: Sequence[torch.Generator],
        generation: torch.Tensor | None = None,
        num_generations: int | None = None,
    ) -> SampleRows:
        return samples_to_probability(self.chain(network, condition, label_shape, generators)), None

    def chain(
        self,
        network: nn.Module,
        condition: torch.Tensor,
        label_shape: Sequence[int],
        generators: Sequence[torch.Generator],
    ) -> torch.Tensor:
        """Label samples (R, *label_shape), about [-1, 1], for R = len(generators) rows of image features; every
        draw of row r (x_T, then per step the latent and the step noise) from ``generators[r]``."""
        rows = len(generators)
        if condition.shape[0] not in (1, rows):
            raise ValueError(f"condition has {condition.shape[0]} rows for {rows} generators")
        latent = latent_size(network)
        return self.run_chain(
            network,
            condition,
            randn_rows(generators, label_shape, condition),
            latent_noise=None if latent is None else lambda k: randn_rows(generators, (latent,), condition),
            step_noise=lambda k: randn_rows(generators, label_shape, condition),
        )

    def run_chain(
        self,
        network: nn.Module,
        condition: torch.Tensor,
        x: torch.Tensor,
        latent_noise: Callable[[int], torch.Tensor] | None,
        step_noise: Callable[[int], torch.Tensor],
    ) -> torch.Tensor:
        """The reverse chain from x_T = ``x`` (R, C, *spatial): at step k, ``latent_noise(k)`` (R, nz) for networks
        with a latent input (None otherwise) and ``step_noise(k)`` like x where the step adds noise. The noise
        source is the caller's: per-row generators (``chain``) or fixed buffers (the deployable segmenter)."""
        rows = x.shape[0]
        for k, (index, prev_index) in enumerate(zip(self.timesteps, self.timesteps[1:] + [-1])):
            t = torch.full((rows,), index, dtype=torch.long, device=x.device)
            inputs = (x, t) if latent_noise is None else (x, t, latent_noise(k))
            output = network(*inputs, image_features=condition).to(x.dtype)
            noise = step_noise(k) if self.step.needs_noise(prev_index) else None
            x = self.step(output, index, prev_index, x, noise)
        return x


def latent_size(network: nn.Module) -> int | None:
    """The size of a network's latent input (its ``nz``), or None for networks without one."""
    latent = getattr(network, "nz", None) or getattr(unwrap_network(network), "nz", None)
    return None if latent is None else int(latent)


class UncachedImageNetwork(nn.Module):
    """Adaptor giving the reference codes' loop: the image encoder runs inside every network call.

    ``encode_image`` returns the image itself and ``forward(..., image_features=image)`` calls the wrapped network
    with ``image=image``, so a sampler run through it recomputes the encoder at every step, as SegDiff's and cDAL's
    reference sampling loops do. Used by the benchmark and the tests to compare against the cached path.
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

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, *args, image_features: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        return self.network(x_t, t, *args, image=image_features, **kwargs)


def make_sampler(
    scheduler: Scheduler,
    method: str = "ancestral",
    num_steps: int | None = None,
    eta: float = 0.0,
    clip_x0: bool | None = None,
) -> DiffusionSampler:
    """The sampler named by ``method``, for configs:

    - ``"ancestral"`` / ``"ddpm"``: all T steps with the scheduler's variance (``num_steps`` and ``eta`` ignored);
      ``clip_x0`` None follows the scheduler (no clipping for cDAL and SegDiff, as the references);
    - ``"ddim"``: ``num_steps`` (default 25) DDIM steps with ``eta``; ``clip_x0`` None clips to [-1, 1], as
      improved-diffusion's and diffusers' DDIM do (with large jumps an unclipped x0_hat, amplified by
      1 / sqrt(abar), carries its error into the next state).
    """
    if method in ("ancestral", "ddpm"):
        return DiffusionSampler(scheduler, clip_x0=clip_x0)
    if method == "ddim":
        steps = 25 if num_steps is None else int(num_steps)
        return DiffusionSampler(scheduler, num_steps=steps, eta=eta, clip_x0=True if clip_x0 is None else clip_x0)
    raise ValueError(f"sampling method must be one of {SAMPLING_METHODS}, got {method!r}")
