"""Samplers: how one method turns a network and an image into label samples, behind one interface.

The ensemble inferer (``bundle.inferers.ensemble.EnsembleInferer``) knows nothing of methods; it asks the method's
sampler for

1. ``encode(network, images)``: the image-dependent part, computed once per image (B rows): the image encoder's
   features of a diffusion network, the U-Net features and prior of a Probabilistic U-Net, the expert weights and
   features of MoSE, or the whole prediction of a deterministic network;
2. ``sample(network, condition, label_shape, generators, generation, num_generations)``: R label samples as
   foreground probabilities (R, C, *spatial) in [0, 1] and optional per-row weights (R,), for R rows of the
   condition (an image's row repeated once per generation, image-major). Every random number of row r is drawn
   from ``generators[r]``, so a generation is the same whether it is computed alone or inside a batch;
   ``generation`` (R,) is each row's index in its image's ensemble of ``num_generations``.

Samplers here: :class:`DeterministicSampler` (a plain segmentation network: sigmoid or softmax of its logits, every
generation identical) and :class:`LatentSampler` (networks with a latent variable that implement
``encode_image(image)`` and ``sample_rows(condition, generators, generation, num_generations, **options)``: the
Probabilistic U-Net, MoSE). Diffusion methods use ``bundle.diffusion.diffusion_sampler.DiffusionSampler``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from bundle.runtime import unwrap_network

__all__ = ["Sampler", "SampleRows", "DeterministicSampler", "LatentSampler", "repeat_rows", "take_rows"]

SampleRows = tuple[torch.Tensor, "torch.Tensor | None"]


def repeat_rows(condition: Any, repeats: int) -> Any:
    """Each row of a tensor (or of every tensor in a tuple/list/dict) repeated ``repeats`` times, row-major."""
    if torch.is_tensor(condition):
        return condition.repeat_interleave(repeats, dim=0)
    if isinstance(condition, Mapping):
        return {k: repeat_rows(v, repeats) for k, v in condition.items()}
    if isinstance(condition, (tuple, list)):
        return type(condition)(repeat_rows(v, repeats) for v in condition)
    return condition


def take_rows(condition: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a tensor (or of every tensor in a tuple/list/dict)."""
    if torch.is_tensor(condition):
        return condition[start:stop]
    if isinstance(condition, Mapping):
        return {k: take_rows(v, start, stop) for k, v in condition.items()}
    if isinstance(condition, (tuple, list)):
        return type(condition)(take_rows(v, start, stop) for v in condition)
    return condition


class Sampler(ABC):
    """The interface the ensemble inferer drives (module docstring)."""

    @property
    def sampling_steps(self) -> int | None:
        """Network calls per generation of an iterative sampler (a reverse diffusion chain); None for samplers that
        draw a generation in one pass (deterministic and latent-variable networks)."""
        return None

    @abstractmethod
    def encode(self, network: nn.Module, images: torch.Tensor) -> Any:
        """What depends on the image alone, once per image: B rows for images (B, C_img, *spatial)."""

    @abstractmethod
    def sample(
        self,
        network: nn.Module,
        condition: Any,
        label_shape: Sequence[int],
        generators: Sequence[torch.Generator],
        generation: torch.Tensor,
        num_generations: int,
    ) -> SampleRows:
        """(probabilities (R, *label_shape) in [0, 1], weights (R,) or None) for R = len(generators) rows."""


class DeterministicSampler(Sampler):
    """A plain segmentation network (the U-Net baseline) in the ensemble format.

    ``encode`` runs the network once per image and applies the activation; every generation is that prediction,
    so the uncertainty is 0 and the distribution metrics see a deterministic model.

    Args:
        activation: ``"sigmoid"`` (independent label channels), ``"softmax"`` (the label channels are exclusive
            one-hot classes with background, e.g. Hippocampus: softmax over all of them, all kept) or ``"auto"``
            (sigmoid for one label channel, softmax for more; the bundle's convention, as MoSE's).
    """

    def __init__(self, activation: str = "auto") -> None:
        if activation not in ("sigmoid", "softmax", "auto"):
            raise ValueError(f"activation must be 'sigmoid', 'softmax' or 'auto', got {activation!r}")
        self.activation = activation

    def encode(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        logits = torch.as_tensor(network(images)).float()
        softmax = self.activation == "softmax" or (self.activation == "auto" and logits.shape[1] > 1)
        return torch.softmax(logits, dim=1) if softmax else torch.sigmoid(logits)

    def sample(self, network, condition, label_shape, generators, generation, num_generations) -> SampleRows:
        return condition, None


class LatentSampler(Sampler):
    """Networks with a latent variable (Probabilistic U-Net prior samples, MoSE experts).

    The network provides ``encode_image(image) -> condition`` and
    ``sample_rows(condition, generators, generation, num_generations, **options) -> (probabilities, weights|None)``.

    Args:
        options: keyword options of ``sample_rows`` (MoSE: ``{"mode": "sampled" | "weighted"}``).
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options = dict(options or {})

    def encode(self, network: nn.Module, images: torch.Tensor) -> Any:
        return network.encode_image(images)

    def sample(self, network, condition, label_shape, generators, generation, num_generations) -> SampleRows:
        model = network if hasattr(network, "sample_rows") else unwrap_network(network)
        if not hasattr(model, "sample_rows"):
            raise TypeError(f"{type(model).__name__} has no sample_rows(condition, generators, generation, ...)")
        return model.sample_rows(condition, generators, generation, num_generations, **self.options)
