"""Inferers that give latent-variable and deterministic networks the ensemble outputs of the diffusion methods.

Both return what ``bundle.diffusion.ensemble_inferer.EnsembleDiffusionInferer`` returns, so validation, evaluation
(``SplitEnsembleOutputd``, GED / HM-IoU / ECE) and inference configs serve every method unchanged:
``mean`` (B, C, H, W) foreground probability, ``uncertainty`` (B, C, H, W) standard deviation over the samples and
``samples`` (B, N * C, H, W) probabilities, generation-major.

- :class:`SamplingInferer`: for networks with ``sample(image, num_samples, generator=...)`` returning
  ``{"probabilities": (B, N, C, H, W), "weights": (B, N) (optional)}`` (Probabilistic U-Net prior samples, MoSE
  experts). With weights (MoSE's weighted form) the mean and uncertainty are weighted, and ``return_weights`` adds
  ``weights`` (B, N) to the outputs.
- :class:`DeterministicInferer`: for a plain segmentation network (the U-Net baseline): sigmoid of the logits; the
  ``samples`` are that one prediction repeated ``num_generations`` times, so the distribution metrics see a
  deterministic model (all its samples equal), and the uncertainty is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer
from torch import nn

from bundle.diffusion.ensemble_inferer import OUTPUT_KEYS
from bundle.diffusion.samplers import unwrap_network

__all__ = ["SamplingInferer", "DeterministicInferer"]


def _check_outputs(outputs: str | Sequence[str]) -> tuple[str, ...]:
    names = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    if not names or set(names) - set(OUTPUT_KEYS):
        raise ValueError(f"outputs must be a non-empty subset of {OUTPUT_KEYS}, got {names}")
    return names


def _select(result: dict[str, torch.Tensor], outputs: tuple[str, ...], extra: Sequence[str] = ()):
    if len(outputs) == 1 and not extra:
        return result[outputs[0]]
    return {k: result[k] for k in (*outputs, *extra)}


def _window(roi_size: Sequence[int] | int | None, sw_batch_size: int, overlap: float) -> SlidingWindowInferer | None:
    if roi_size is None:
        return None
    return SlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode="constant")


def _fits(window: SlidingWindowInferer | None, images: torch.Tensor) -> bool:
    """True when no tiling is needed (no window, or the image is not larger than the window)."""
    if window is None:
        return True
    roi = window.roi_size
    roi = [roi] * (images.ndim - 2) if isinstance(roi, int) else list(roi)
    return all(s <= r for s, r in zip(images.shape[2:], roi))


class SamplingInferer(Inferer):
    """``num_generations`` samples of a latent-variable segmentation network per image.

    Args:
        num_generations: samples per image N (MoSE weighted form: a multiple of its number of experts).
        outputs: names from ``("mean", "uncertainty", "samples")``; one name returns a tensor, several a dict.
        return_weights: add the sample weights (B, N) as ``weights`` (needs whole-image inference, no tiling).
        roi_size: tile size for sliding-window inference (None or an image no larger than it: one pass).
        sw_batch_size, overlap: sliding-window settings.
        seed: seed of the inferer's random stream (None: drawn from torch's global RNG).
        sample_kwargs: extra keyword arguments of ``network.sample`` (e.g. ``{"mode": "weighted"}`` for MoSE).
    """

    def __init__(
        self,
        num_generations: int = 16,
        outputs: str | Sequence[str] = ("mean", "uncertainty"),
        return_weights: bool = False,
        roi_size: Sequence[int] | int | None = None,
        sw_batch_size: int = 4,
        overlap: float = 0.0,
        seed: int | None = None,
        sample_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        self.num_generations = int(num_generations)
        self.outputs = _check_outputs(outputs)
        self.return_weights = bool(return_weights)
        self.window = _window(roi_size, sw_batch_size, overlap)
        self.sample_kwargs = dict(sample_kwargs or {})
        self._stream = torch.Generator().manual_seed(int(seed)) if seed is not None else None

    def _generator(self, device: torch.device) -> torch.Generator:
        seed = torch.randint(0, 2**62, (1,), generator=self._stream) if self._stream is not None else torch.randint(
            0, 2**62, (1,))
        return torch.Generator(device=device).manual_seed(int(seed))

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor | dict:
        """Samples for images (B, C_img, H, W); see the module docstring for the outputs."""
        if _fits(self.window, inputs):
            return self.ensemble(inputs, network)
        if self.return_weights:
            raise ValueError(
                f"return_weights needs whole-image inference, but the image {tuple(inputs.shape[2:])} is tiled by "
                f"roi_size {self.window.roi_size}; tiles have their own weights"
            )
        return self.window(inputs, partial(self.ensemble, network=network))

    @torch.no_grad()
    def ensemble(self, images: torch.Tensor, network: nn.Module) -> torch.Tensor | dict:
        """Samples of one batch of images, no tiling."""
        model = unwrap_network(network)
        if not hasattr(model, "sample"):
            raise TypeError(f"{type(model).__name__} has no sample(image, num_samples, generator) method")
        drawn = model.sample(images, self.num_generations, generator=self._generator(images.device),
                             **self.sample_kwargs)
        probs = drawn["probabilities"].float()
        b, n = probs.shape[:2]
        weights = drawn.get("weights")
        weights = torch.full((b, n), 1.0 / n, device=probs.device) if weights is None else weights.float()
        w = weights.reshape(b, n, *([1] * (probs.ndim - 2)))
        mean = (w * probs).sum(1)
        variance = (w * (probs - mean[:, None]) ** 2).sum(1)
        result = {"mean": mean, "uncertainty": variance.clamp(min=0).sqrt(),
                  "samples": probs.reshape(b, -1, *probs.shape[3:]), "weights": weights}
        return _select(result, self.outputs, ("weights",) if self.return_weights else ())


class DeterministicInferer(Inferer):
    """One pass of a segmentation network, reported in the ensemble format (see the module docstring).

    Args:
        num_generations: how many (identical) samples to report per image.
        outputs: names from ``("mean", "uncertainty", "samples")``.
        activation: ``"sigmoid"`` (independent channels) or ``"softmax"`` (channel 0 = background, dropped).
        roi_size, sw_batch_size, overlap: sliding-window settings (None: ``SimpleInferer``, one pass).
    """

    def __init__(
        self,
        num_generations: int = 1,
        outputs: str | Sequence[str] = ("mean", "uncertainty"),
        activation: str = "sigmoid",
        roi_size: Sequence[int] | int | None = None,
        sw_batch_size: int = 4,
        overlap: float = 0.0,
    ) -> None:
        super().__init__()
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
        self.num_generations = int(num_generations)
        self.outputs = _check_outputs(outputs)
        self.activation = activation
        self.window = _window(roi_size, sw_batch_size, overlap)
        self.simple = SimpleInferer()

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor | dict:
        """Probabilities for images (B, C_img, H, W)."""
        logits = (self.simple if _fits(self.window, inputs) else self.window)(inputs, network)
        logits = torch.as_tensor(logits).float()
        probs = torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=1)[:, 1:]
        result = {"mean": probs, "uncertainty": torch.zeros_like(probs),
                  "samples": probs.repeat(1, self.num_generations, *([1] * (probs.ndim - 2)))}
        return _select(result, self.outputs)
