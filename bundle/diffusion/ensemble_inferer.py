"""Ensemble inference for diffusion segmentation: N generations per image, averaged.

``EnsembleDiffusionInferer`` is a MONAI ``Inferer``: ``inferer(images, network)`` returns the mean foreground
probability (B, C, H, W) in [0, 1], and on request a dict that adds the per-pixel uncertainty (standard deviation
of the generations' probabilities) and the samples themselves. The image encoder runs once per image; the N
generations of an image run as one batch (optionally in chunks of ``generation_batch_size``).
With ``autocast`` the network forwards run in reduced precision (bf16 on CPUs with AMX/AVX-512 BF16 and on recent
GPUs) while the sampler's arithmetic stays fp32. With ``roi_size`` it tiles the input through MONAI's ``SlidingWindowInferer`` (MoNuSeg protocol: a 512x512 image
as four non-overlapping 256x256 tiles) and stitches the tiles.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from functools import partial

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer
from torch import nn

from bundle.diffusion.samplers import DiffusionSampler, unwrap_network
from bundle.engines.flags import FALSE, TRUE, as_bool

OUTPUT_KEYS = ("mean", "uncertainty", "samples")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def autocast_dtype(value: str | torch.dtype | bool | None) -> torch.dtype | None:
    """``None``/``False``: full precision; ``True`` or "bfloat16"/"bf16": bf16; "float16"/"fp16": fp16
    (the strings "true"/"false" of a command-line ``--amp`` too)."""
    if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
        value = as_bool(value, "autocast")
    if value is None or value is False:
        return None
    if value is True:
        return torch.bfloat16
    if isinstance(value, torch.dtype):
        if value not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast dtype must be bfloat16 or float16, got {value}")
        return value
    if str(value).lower() not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be one of {sorted(AUTOCAST_DTYPES)} or None, got {value!r}")
    return AUTOCAST_DTYPES[str(value).lower()]


class AutocastNetwork(nn.Module):
    """Runs a conditional diffusion network's ``encode_image`` and ``forward`` under ``torch.autocast`` and hands
    the predictions back in fp32, so a sampler's update arithmetic is not done in the reduced precision."""

    def __init__(self, network: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.network = network
        self.dtype = dtype
        inner = unwrap_network(network)
        for name in ("label_channels", "nz"):  # attributes the samplers read
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def _autocast(self, like: torch.Tensor) -> torch.autocast:
        return torch.autocast(device_type=like.device.type, dtype=self.dtype)

    def encode_image(self, image: torch.Tensor):
        with self._autocast(image):
            features = unwrap_network(self.network).encode_image(image)
        # fp32 features: samplers draw their noise like the condition, and the network re-casts under autocast
        return features.float() if torch.is_tensor(features) and features.is_floating_point() else features

    def forward(self, x_t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with self._autocast(x_t):
            out = self.network(x_t, *args, **kwargs)
        return out.float()


def samples_to_probability(samples: torch.Tensor) -> torch.Tensor:
    """Map label samples in [-1, 1] to foreground probabilities: clamp((x + 1) / 2, 0, 1)."""
    return ((samples + 1.0) / 2.0).clamp(0.0, 1.0)


class EnsembleDiffusionInferer(Inferer):
    """Average ``num_generations`` samples of a conditional diffusion model.

    Args:
        sampler: the method's sampler (e.g. ``PosteriorSampler`` for cDAL).
        num_generations: ensemble size N (cDAL: 5 on MoNuSeg, 30 on CXR; SegDiff: 9).
        label_channels: label channels C, used when the network has no ``label_channels`` attribute.
        outputs: which outputs to return; a single name returns a tensor, several a dict with keys from
            ``("mean", "uncertainty", "samples")``. ``samples`` is (B, N * C, H, W) probabilities, generation-major.
        roi_size: tile size for sliding-window inference (None: whole image in one pass).
        sw_batch_size: tiles per sliding-window batch.
        overlap: sliding-window overlap (0 for the MoNuSeg protocol).
        generation_batch_size: most rows (image x generation) per network call; None runs all at once.
        autocast: run the network forwards under ``torch.autocast`` in this dtype ("bfloat16" / "float16";
            None or False: full precision). The noise, the sampler updates and the averaging stay fp32.
        seed: seed of the noise. With a seed, the noise of an image is a function of the seed and the image's file
            name (``filename_or_obj`` in the input's metadata), so an image gets the same generations whatever
            batch, rank or order it comes in (tiles of one call share that image's stream); inputs without a
            file name draw from one stream seeded once. None: noise from torch's global RNG.
    """

    def __init__(
        self,
        sampler: DiffusionSampler,
        num_generations: int = 5,
        label_channels: int = 1,
        outputs: str | Sequence[str] = "mean",
        roi_size: Sequence[int] | int | None = None,
        sw_batch_size: int = 4,
        overlap: float = 0.0,
        generation_batch_size: int | None = None,
        seed: int | None = None,
        autocast: str | torch.dtype | bool | None = None,
    ) -> None:
        super().__init__()
        if num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {num_generations}")
        self.sampler = sampler
        self.num_generations = int(num_generations)
        self.label_channels = int(label_channels)
        self.outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        unknown = set(self.outputs) - set(OUTPUT_KEYS)
        if unknown or not self.outputs:
            raise ValueError(f"outputs must be a non-empty subset of {OUTPUT_KEYS}, got {self.outputs}")
        self.generation_batch_size = generation_batch_size
        self.window = (
            None
            if roi_size is None
            else SlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode="constant")
        )
        self.seed = seed
        self.autocast = autocast_dtype(autocast)
        self._stream = torch.Generator().manual_seed(int(seed)) if seed is not None else None

    def noise_stream(self, inputs: torch.Tensor) -> torch.Generator | None:
        """The random stream of one call: derived from the seed and the images' file names when both exist."""
        if self.seed is None:
            return None
        names = inputs.meta.get("filename_or_obj") if isinstance(inputs, MetaTensor) else None
        if not names:
            return self._stream
        key = "|".join(str(n) for n in (names if isinstance(names, (list, tuple)) else [names]))
        return torch.Generator().manual_seed(int(self.seed) * 1_000_003 + zlib.crc32(key.encode()))

    @staticmethod
    def _row_generators(rows: int, device: torch.device, stream: torch.Generator | None) -> list[torch.Generator]:
        seeds = torch.randint(0, 2**62, (rows,), generator=stream)
        return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor | dict:
        """Ensemble prediction for images (B, C_img, H, W); see the class docstring for the outputs."""
        stream = self.noise_stream(inputs)
        if self.window is None:
            return self.ensemble(inputs, network, stream=stream)
        return self.window(inputs, partial(self.ensemble, network=network, stream=stream))

    @torch.no_grad()
    def ensemble(
        self,
        images: torch.Tensor,
        network: nn.Module,
        generators: Sequence[torch.Generator] | None = None,
        stream: torch.Generator | None = None,
    ) -> torch.Tensor | dict:
        """Ensemble over one batch of images (no tiling). ``generators`` (B * N, image-major) fixes the noise;
        otherwise they are seeded from ``stream`` (None: torch's global RNG)."""
        if isinstance(images, MetaTensor):
            images = images.as_tensor()  # per-row slicing below must not split batched metadata
        batch, n = images.shape[0], self.num_generations
        channels = getattr(unwrap_network(network), "label_channels", self.label_channels)
        label_shape = (channels, *images.shape[2:])
        if generators is None:
            generators = self._row_generators(batch * n, images.device, stream)
        if len(generators) != batch * n:
            raise ValueError(f"need {batch * n} generators (batch {batch} x {n} generations), got {len(generators)}")
        if self.autocast is not None:
            network = AutocastNetwork(network, self.autocast)
        condition = self.sampler.encode(network, images)
        condition = condition.repeat_interleave(n, dim=0)
        chunk = self.generation_batch_size or batch * n
        parts = [
            self.sampler.sample(network, condition[s : s + chunk], label_shape, generators[s : s + chunk])
            for s in range(0, batch * n, chunk)
        ]
        probs = samples_to_probability(torch.cat(parts)).reshape(batch, n, *label_shape)
        result = {
            "mean": probs.mean(dim=1),
            "uncertainty": probs.std(dim=1, unbiased=False),
            "samples": probs.reshape(batch, n * channels, *label_shape[1:]),
        }
        if len(self.outputs) == 1:
            return result[self.outputs[0]]
        return {k: result[k] for k in self.outputs}
