"""A diffusion segmenter as one deployable function: image in, ensemble mean probability and uncertainty out.

``DeployableDiffusionSegmenter`` wraps a trained conditional diffusion network (cDAL's generator, SegDiff's eps
network) and its ``DiffusionSampler`` into a module whose ``forward(image)`` is the whole ensemble: the image encoder
once, the sampler's T (or DDIM) steps unrolled, the N generations as one batch, the noise drawn once, when the
module is built, from ``seed`` and kept in (non-persistent) buffers, so a call is a pure function of the image that
TorchScript (trace) and ONNX export as they are and that reproduces the same output on every run.

Output: (B, 2C, H, W) float32: channels 0..C-1 the ensemble mean foreground probability in [0, 1], channels
C..2C-1 the uncertainty (the standard deviation of the generations' probabilities, in [0, 0.5]). The input is one
window of the size the module was built for (``image_size``, the bundle's ``roi_size``); larger images are tiled
around it (MONAI's ``SlidingWindowInferer``), as the bundle's own inference does. Every image of a batch gets the
same noise, so an image's output does not depend on its batch.

The module registers the network's children (and direct parameters and buffers) as its own, so its
``state_dict`` has exactly the keys of the network's: ``models/model.pt`` loads into it unchanged, which is what the
MONAI model zoo's ``ckpt_export`` and ``verify_net_in_out`` (``net_id = deploy_network_def``) rely on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bundle.diffusion.diffusion_sampler import DiffusionSampler, latent_size, samples_to_probability

__all__ = ["DeployableDiffusionSegmenter"]


class DeployableDiffusionSegmenter(nn.Module):
    """``forward(image) -> cat(mean, uncertainty)`` of ``num_generations`` fixed-noise samples (module docstring).

    Args:
        network: the diffusion network (``encode_image``, ``forward(x_t, t[, z], image_features=...)``, attributes
            ``label_channels`` and, for networks with a latent input, ``nz``).
        sampler: the method's ``DiffusionSampler`` (its time steps and reverse step are used as they are).
        num_generations: ensemble size N.
        image_size: the (H, W) window the noise is drawn for.
        seed: seed of the fixed noise.
    """

    def __init__(
        self,
        network: nn.Module,
        sampler: DiffusionSampler,
        num_generations: int = 5,
        image_size: Sequence[int] = (64, 64),
        seed: int = 0,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_network", network)  # called, not registered: its parts are registered below
        for name, child in network.named_children():
            self.add_module(name, child)
        for name, parameter in network.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in network.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        if int(num_generations) < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        self.sampler = sampler
        self.num_generations = int(num_generations)
        self.label_channels = int(network.label_channels)
        self.image_size = tuple(int(s) for s in image_size)
        steps = len(sampler.timesteps)
        shape = (self.num_generations, self.label_channels, *self.image_size)
        generator = torch.Generator().manual_seed(int(seed))
        self.register_buffer("initial_noise", torch.randn(shape, generator=generator), persistent=False)
        self.register_buffer("step_noise", torch.randn((steps, *shape), generator=generator), persistent=False)
        latent = latent_size(network)
        latents = None if latent is None else torch.randn((steps, self.num_generations, latent), generator=generator)
        self.register_buffer("latents", latents, persistent=False)

    def _rows(self, noise: torch.Tensor, batch: int) -> torch.Tensor:
        """(N, ...) noise repeated for ``batch`` images, image-major: (batch * N, ...)."""
        return noise.repeat(batch, *([1] * (noise.ndim - 1)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C_img, H, W) normalised image -> (B, 2C, H, W): mean probability, then uncertainty."""
        batch, n = image.shape[0], self.num_generations
        if tuple(image.shape[2:]) != self.image_size:
            raise ValueError(f"this segmenter takes {self.image_size} windows, got {tuple(image.shape[2:])}")
        condition = self._network.encode_image(image).repeat_interleave(n, dim=0)
        x = self.sampler.run_chain(
            self._network,
            condition,
            self._rows(self.initial_noise, batch),
            latent_noise=None if self.latents is None else lambda k: self._rows(self.latents[k], batch),
            step_noise=lambda k: self._rows(self.step_noise[k], batch),
        )
        probs = samples_to_probability(x).reshape(batch, n, self.label_channels, *self.image_size)
        mean = probs.mean(dim=1)
        uncertainty = (probs - mean[:, None]).pow(2).mean(dim=1).sqrt()
        return torch.cat([mean, uncertainty], dim=1)
