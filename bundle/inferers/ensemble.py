"""The one ensemble inferer of the bundle: N generations per image, averaged, for every method and data shape.

``EnsembleInferer`` is a MONAI ``Inferer``: ``inferer(images, network)`` returns the mean foreground probability
(B, C, *spatial) in [0, 1], or, when several ``outputs`` are asked for, a dict that adds the per-pixel uncertainty
(standard deviation of the generations' probabilities), the samples and the sample weights. What a generation is
comes from the method's sampler (``bundle.inferers.samplers``): a diffusion chain, a latent draw of a Probabilistic
U-Net or MoSE, or the one prediction of a deterministic U-Net. For every method:

- the image-dependent part runs once per image (``sampler.encode``); the N generations of an image run as one
  batch (optionally in chunks of ``generation_batch_size`` rows);
- one seeding rule: with a ``seed``, the noise of an image is a function of the seed and the image's file name
  (``filename_or_obj`` in the input's metadata), so an image gets the same generations whatever batch, rank or
  order it comes in; each generation draws from its own ``torch.Generator``, so batched == sequential;
- one place for reduced precision: ``autocast`` runs the network calls in bf16/fp16 (``AutocastNetwork``) while
  the sampler's arithmetic and the averaging stay fp32;
- one tiling rule: 2-D images larger (or smaller) than ``roi_size`` go through MONAI's ``SlidingWindowInferer``
  (MoNuSeg protocol: a 512x512 image as four non-overlapping 256x256 tiles); 3-D volumes (B, C, H, W, D) go
  slice by slice along ``slice_axis`` through MONAI's ``SliceInferer`` with 2-D windows of ``roi_size`` and
  ``overlap`` (the cDAL Hippocampus protocol: axial 32x32 windows, overlap 0.75), overlapping windows averaged;
  a 3-D network (a 3-D ``roi_size`` without ``slice_axis``) sees 3-D windows of the volume, the same way;
- one fast switch for volumes: ``whole_slices`` sends every slice whole (padded by edge replication to a multiple of
  ``size_divisor`` for a fully convolutional network) instead of overlapping windows, one window per slice.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer
from monai.utils import convert_to_dst_type
from torch import nn

from bundle.inferers.autocast import AutocastNetwork, ChannelsLastNetwork, autocast_dtype, resolve_autocast
from bundle.inferers.samplers import Sampler, repeat_rows, take_rows
from bundle.runtime import as_bool, unwrap_network

__all__ = ["EnsembleInferer", "OUTPUT_KEYS"]

logger = logging.getLogger(__name__)

OUTPUT_KEYS = ("mean", "uncertainty", "samples", "weights")


def network_size_divisor(network: nn.Module) -> int:
    """What the input sides of ``network`` must be a multiple of (its ``size_divisor``: 2 ** (levels - 1) for the
    U-Net-shaped networks here), looked up through the DDP / compile / autocast wrappers; 1 when it says nothing."""
    for _ in range(8):
        divisor = getattr(network, "size_divisor", None)
        if divisor:
            return int(divisor)
        inner = unwrap_network(network)
        inner = inner if inner is not network else getattr(network, "network", None)
        if not isinstance(inner, nn.Module):
            return 1
        network = inner
    return 1


class EnsembleInferer(Inferer):
    """Average ``num_generations`` samples of a segmentation method per image (module docstring).

    Args:
        sampler: the method's sampler (``DiffusionSampler``, ``LatentSampler``, ``DeterministicSampler``).
        num_generations: ensemble size N (cDAL: 5 on MoNuSeg, 30 on CXR; SegDiff: 9; U-Net: 1).
        outputs: names from ``("mean", "uncertainty", "samples", "weights")``; one name returns a tensor, several a
            dict. ``samples`` is (B, N * C, *spatial), generation-major; ``weights`` (B, N) the samples' weights
            (uniform 1 / N unless the sampler weighs them, as MoSE's weighted form; whole-image inference only).
        roi_size: the 2-D window (None: whole 2-D images in one pass; whole slices for volumes), or a 3-D window
            (H, W, D) for a 3-D network on volumes (``slice_axis`` None).
        sw_batch_size: windows per network batch (each runs N rows).
        overlap: window overlap (0 for the MoNuSeg protocol, 0.75 for the Hippocampus slices).
        slice_axis: axis among the spatial axes (H, W, D) = (0, 1, 2) along which a volume is cut into 2-D slices
            (2 = axial for LPI/RAS volumes); None: volumes are refused unless ``roi_size`` is 3-D.
        label_channels: label channels C, when the network has no ``label_channels`` attribute.
        generation_batch_size: most rows (image x generation) per sampler call; None: all at once.
        seed: seed of the noise (see the module docstring); None: torch's global random stream.
        autocast: "bfloat16" / "float16" / True (bf16) for reduced-precision network calls; None/False: fp32;
            "auto": bf16 where the inputs' device computes it natively (CUDA with bf16, CPUs with AMX or AVX-512
            BF16), fp32 elsewhere, decided at the first call and logged.
        channels_last: hand the network its image-shaped inputs in channels-last memory format (same values;
            faster oneDNN convolutions on CPUs).
        whole_slices: volumes cut along ``slice_axis`` go through the network one whole slice at a time (padded by
            edge replication to a multiple of ``size_divisor``, cropped back) instead of ``roi_size`` windows with
            ``overlap``: the fast protocol for fully convolutional networks (docs/benchmarks.md has its Dice
            against the windowed paper protocol).
        size_divisor: what the input sides must be a multiple of (4 for the generators here); a network that says
            more (its ``size_divisor`` attribute: 8 for a three-stride U-Net) is padded to both.
    """

    def __init__(
        self,
        sampler: Sampler,
        num_generations: int = 5,
        outputs: str | Sequence[str] = ("mean", "uncertainty"),
        roi_size: Sequence[int] | int | None = None,
        sw_batch_size: int = 4,
        overlap: float = 0.0,
        slice_axis: int | None = None,
        label_channels: int = 1,
        generation_batch_size: int | None = None,
        seed: int | None = None,
        autocast: str | torch.dtype | bool | None = None,
        channels_last: bool = False,
        whole_slices: bool = False,
        size_divisor: int = 4,
    ) -> None:
        super().__init__()
        self._options = {k: v for k, v in locals().items() if k not in ("self", "__class__") and not k.startswith("_")}
        if int(num_generations) < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        self.sampler = sampler
        self.num_generations = int(num_generations)
        self.outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        if not self.outputs or set(self.outputs) - set(OUTPUT_KEYS):
            raise ValueError(f"outputs must be a non-empty subset of {OUTPUT_KEYS}, got {self.outputs}")
        if roi_size is not None:
            roi_size = [int(roi_size)] * 2 if isinstance(roi_size, int) else [int(s) for s in roi_size]
            if len(roi_size) not in (2, 3) or (len(roi_size) == 3 and slice_axis is not None):
                raise ValueError(
                    f"roi_size must be a 2-D window (H, W), or a 3-D window (H, W, D) for a 3-D network without "
                    f"slice_axis; got {roi_size} with slice_axis {slice_axis}"
                )
        self.roi_size = roi_size
        self.sw_batch_size = int(sw_batch_size)
        self.overlap = float(overlap)
        self.slice_axis = None if slice_axis is None else int(slice_axis)
        self.label_channels = int(label_channels)
        self.generation_batch_size = generation_batch_size
        self.seed = seed
        auto = isinstance(autocast, str) and autocast.strip().lower() == "auto"
        self.autocast = "auto" if auto else autocast_dtype(autocast)
        self._resolved: dict[str, torch.dtype | None] = {}
        self.channels_last = as_bool(channels_last, "channels_last")
        self.whole_slices = as_bool(whole_slices, "whole_slices")
        self.size_divisor = int(size_divisor)
        if self.size_divisor < 1:
            raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
        self._stream = torch.Generator().manual_seed(int(seed)) if seed is not None else None

    def with_options(self, **changes: Any) -> EnsembleInferer:
        """A new inferer with this one's settings except ``changes`` (e.g. the cheaper ensemble of model
        selection: ``inferer.with_options(num_generations=2, overlap=0.5)``)."""
        unknown = set(changes) - set(self._options)
        if unknown:
            raise TypeError(f"EnsembleInferer has no option(s) {sorted(unknown)}")
        return type(self)(**{**self._options, **changes})

    def network_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype of the network calls on ``device`` (None: fp32); ``"auto"`` is resolved once per
        device type and logged."""
        if self.autocast != "auto":
            return self.autocast
        if device.type not in self._resolved:
            self._resolved[device.type] = resolve_autocast("auto", device)
            chosen = self._resolved[device.type]
            logger.info("amp auto: %s network calls on %s", "bf16" if chosen else "fp32 (no native bf16)", device)
        return self._resolved[device.type]

    # -------------------------------------------------------------------------------------------- noise
    def noise_stream(self, inputs: torch.Tensor) -> torch.Generator | None:
        """The random stream of one call: from the seed and the images' file names when both exist."""
        if self.seed is None:
            return None
        names = inputs.meta.get("filename_or_obj") if isinstance(inputs, MetaTensor) else None
        if not names:
            return self._stream
        key = "|".join(str(n) for n in (names if isinstance(names, (list, tuple)) else [names]))
        return torch.Generator().manual_seed(int(self.seed) * 1_000_003 + zlib.crc32(key.encode()))

    @staticmethod
    def row_generators(rows: int, device: torch.device, stream: torch.Generator | None) -> list[torch.Generator]:
        """``rows`` generators on ``device`` seeded from ``stream`` (None: torch's global stream)."""
        seeds = torch.randint(0, 2**62, (rows,), generator=stream)
        return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    # -------------------------------------------------------------------------------------------- calls
    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor | dict:
        """Ensemble prediction for images (B, C_img, H, W) or volumes (B, C_img, H, W, D).

        A ``MetaTensor`` input gives ``MetaTensor`` outputs with its metadata and transform history, so that
        ``Invertd`` can undo the preprocessing on the predictions (as MONAI's inferers do).
        """
        result = self._infer(inputs, network)
        if not isinstance(inputs, MetaTensor):
            return result
        if isinstance(result, dict):
            return {k: v if k == "weights" else _with_meta(v, inputs) for k, v in result.items()}
        return _with_meta(result, inputs)

    def _infer(self, inputs: torch.Tensor, network: nn.Module) -> torch.Tensor | dict:
        stream = self.noise_stream(inputs)
        if isinstance(inputs, MetaTensor):  # per-row slicing must not split batched metadata
            inputs = inputs.as_tensor()
        run = partial(self.ensemble, network=network, stream=stream)
        if inputs.ndim == 5 and self.roi_size is not None and len(self.roi_size) == 3:
            return self._windows(inputs, run)  # a 3-D network: 3-D windows
        if inputs.ndim == 5:
            if self.slice_axis is None:
                raise ValueError(
                    f"got a volume of shape {tuple(inputs.shape)} but this inferer is 2-D; set slice_axis (e.g. "
                    "--slice_axis 2) to infer it slice by slice"
                )
            slice_shape = [s for a, s in enumerate(inputs.shape[2:]) if a != self.slice_axis]
            if self.whole_slices:  # one window per slice: the slice padded up to the network's size multiple
                divisor = math.lcm(self.size_divisor, network_size_divisor(network))
                roi, overlap, padding = [-(-s // divisor) * divisor for s in slice_shape], 0.0, "replicate"
            else:
                roi, overlap, padding = list(self.roi_size or slice_shape), self.overlap, "constant"
            slicer = SliceInferer(
                spatial_dim=self.slice_axis,
                roi_size=tuple(roi),
                sw_batch_size=self.sw_batch_size,
                overlap=overlap,
                mode="constant",
                padding_mode=padding,
            )
            self._refuse_tiled_weights()
            return slicer(inputs, run)
        if inputs.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W) or volumes (B, C, H, W, D), got {tuple(inputs.shape)}")
        if self.roi_size is not None and len(self.roi_size) == 3:
            raise ValueError(f"a 3-D window {self.roi_size} needs volumes (B, C, H, W, D), got {tuple(inputs.shape)}")
        return self._windows(inputs, run)

    def _windows(self, inputs: torch.Tensor, run: Any) -> torch.Tensor | dict:
        """Whole images (volumes) in one pass when they are the window's size, else MONAI's sliding window."""
        if self.roi_size is None or list(inputs.shape[2:]) == self.roi_size:
            return run(inputs)
        self._refuse_tiled_weights()
        window = SlidingWindowInferer(
            roi_size=self.roi_size, sw_batch_size=self.sw_batch_size, overlap=self.overlap, mode="constant"
        )
        return window(inputs, run)

    def _refuse_tiled_weights(self) -> None:
        if "weights" in self.outputs:
            raise ValueError("the 'weights' output needs whole-image inference: windows and slices have their own")

    @torch.no_grad()
    def ensemble(
        self,
        images: torch.Tensor,
        network: nn.Module,
        generators: Sequence[torch.Generator] | None = None,
        stream: torch.Generator | None = None,
    ) -> torch.Tensor | dict:
        """Ensemble over one batch of 2-D images (B, C_img, H, W), no tiling.

        ``generators`` (B * N, image-major) fixes the noise; otherwise they are seeded from ``stream``.
        """
        if isinstance(images, MetaTensor):
            images = images.as_tensor()
        batch, n = images.shape[0], self.num_generations
        channels = int(getattr(unwrap_network(network), "label_channels", self.label_channels))
        label_shape = (channels, *images.shape[2:])
        if generators is None:
            generators = self.row_generators(batch * n, images.device, stream)
        if len(generators) != batch * n:
            raise ValueError(f"need {batch * n} generators (batch {batch} x {n} generations), got {len(generators)}")
        dtype = self.network_dtype(images.device)
        if self.channels_last:
            network = ChannelsLastNetwork(network, dtype)
        elif dtype is not None:
            network = AutocastNetwork(network, dtype)
        condition = repeat_rows(self.sampler.encode(network, images), n)
        generation = torch.arange(n, device=images.device).repeat(batch)
        chunk = self.generation_batch_size or batch * n
        probabilities, weights = [], []
        for start in range(0, batch * n, chunk):
            stop = min(start + chunk, batch * n)
            probs, w = self.sampler.sample(
                network,
                take_rows(condition, start, stop),
                label_shape,
                generators[start:stop],
                generation[start:stop],
                n,
            )
            probabilities.append(probs.float())
            weights.append(torch.full((stop - start,), 1.0 / n, device=probs.device) if w is None else w.float())
        probs = torch.cat(probabilities).reshape(batch, n, *label_shape)
        w = torch.cat(weights).reshape(batch, n)
        w_b = w.reshape(batch, n, *([1] * len(label_shape)))
        mean = (w_b * probs).sum(1)
        variance = (w_b * (probs - mean[:, None]) ** 2).sum(1)
        result = {
            "mean": mean,
            "uncertainty": variance.clamp(min=0).sqrt(),
            "samples": probs.reshape(batch, n * channels, *label_shape[1:]),
            "weights": w,
        }
        if len(self.outputs) == 1:
            return result[self.outputs[0]]
        return {k: result[k] for k in self.outputs}


def _with_meta(output: torch.Tensor, reference: MetaTensor) -> MetaTensor:
    """``output`` as a MetaTensor carrying ``reference``'s metadata and applied operations."""
    return convert_to_dst_type(output, dst=reference, dtype=output.dtype)[0]
