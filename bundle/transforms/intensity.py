"""Colour augmentation of RGB tiles with torchvision ``ColorJitter`` semantics, without torchvision."""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type

__all__ = ["RandColorJitterd", "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue"]

_MAX = 255.0
_GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def _grey(image: torch.Tensor) -> torch.Tensor:
    """Luma of a (3, H, W) image, shape (1, H, W)."""
    r, g, b = image.unbind(0)
    return (_GREY_WEIGHTS[0] * r + _GREY_WEIGHTS[1] * g + _GREY_WEIGHTS[2] * b).unsqueeze(0)


def _blend(a: torch.Tensor, b: torch.Tensor | float, ratio: float) -> torch.Tensor:
    return (ratio * a + (1.0 - ratio) * b).clamp(0.0, _MAX)


def adjust_brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply a (3, H, W) 0-255 image by ``factor`` >= 0; result clamped to [0, 255]."""
    return (image * factor).clamp(0.0, _MAX)


def adjust_contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend a (3, H, W) 0-255 image with its mean luma (a scalar); factor 0 gives flat grey."""
    return _blend(image, _grey(image).mean(), factor)


def adjust_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend a (3, H, W) 0-255 image with its luma image; factor 0 gives greyscale."""
    return _blend(image, _grey(image), factor)


def _rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] -> (3, H, W) HSV in [0, 1] (torchvision's formulas)."""
    r, g, b = rgb.unbind(0)
    maxc, _ = rgb.max(dim=0)
    minc, _ = rgb.min(dim=0)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc))


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """(3, H, W) HSV in [0, 1] -> (3, H, W) RGB in [0, 1].

    Closed form of the sector formulas torchvision uses: channel n in (R, G, B) = (5, 3, 1) is
    ``v - v * s * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h) mod 6``.
    """
    h, s, v = hsv.unbind(0)
    offsets = torch.tensor((5.0, 3.0, 1.0), dtype=hsv.dtype, device=hsv.device).view(3, 1, 1)
    k = torch.remainder(offsets + 6.0 * h, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return (v - v * s * ramp).clamp(0.0, 1.0)


def adjust_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of a (3, H, W) 0-255 image by ``shift`` turns, ``shift`` in [-0.5, 0.5]."""
    hsv = _rgb_to_hsv(image.clamp(0.0, _MAX) / _MAX)
    hsv[0] = torch.remainder(hsv[0] + shift, 1.0)
    return (_hsv_to_rgb(hsv) * _MAX).clamp(0.0, _MAX)


def _factor_range(value: float | Sequence[float], name: str, centre: float, bound: tuple[float, float]):
    """torchvision's ``_check_input``: a number v gives [centre - v, centre + v] cut to ``bound``.

    Returns None when the range is the single point ``centre`` (the adjustment is skipped).
    """
    if isinstance(value, numbers.Number):
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
        low, high = centre - float(value), centre + float(value)
        if name != "hue":
            low = max(low, 0.0)
    elif isinstance(value, Sequence) and len(value) == 2:
        low, high = float(value[0]), float(value[1])
    else:
        raise ValueError(f"{name} must be a number or a (min, max) pair, got {value!r}")
    if not bound[0] <= low <= high <= bound[1]:
        raise ValueError(f"{name} range must lie within {bound}, got ({low}, {high})")
    return None if low == high == centre else (low, high)


class RandColorJitterd(RandomizableTransform, MapTransform):
    """Random brightness, contrast, saturation and hue, as torchvision's ``ColorJitter``.

    Factors are drawn uniformly: brightness, contrast and saturation in
    ``[max(0, 1 - v), 1 + v]`` and the hue shift in ``[-h, h]`` turns (or from explicit
    ``(min, max)`` pairs), then applied in a random order. Brightness multiplies; contrast
    blends with the mean luma; saturation blends with the luma image; hue rotates H in HSV. A
    strength of 0 skips its adjustment, so all-zero strengths leave the image unchanged.

    Images are (3, H, W) RGB on the 0-255 scale; every step clamps to [0, 255]. All keys of one
    call share the same factors. Seed with ``set_random_state``.

    Args:
        keys: keys of the RGB images.
        brightness, contrast, saturation: strength v >= 0, or a (min, max) factor range.
        hue: strength h in [0, 0.5], or a (min, max) shift range within [-0.5, 0.5].
        prob: probability of jittering at all.
        allow_missing_keys: don't raise when a key is absent.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        keys: KeysCollection,
        brightness: float | Sequence[float] = 0.4,
        contrast: float | Sequence[float] = 0.4,
        saturation: float | Sequence[float] = 0.4,
        hue: float | Sequence[float] = 0.1,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        inf = float("inf")
        self.brightness = _factor_range(brightness, "brightness", 1.0, (0.0, inf))
        self.contrast = _factor_range(contrast, "contrast", 1.0, (0.0, inf))
        self.saturation = _factor_range(saturation, "saturation", 1.0, (0.0, inf))
        self.hue = _factor_range(hue, "hue", 0.0, (-0.5, 0.5))
        self.order: list[int] = [0, 1, 2, 3]
        self.factors: list[float | None] = [None, None, None, None]

    def randomize(self, data: Any = None) -> None:
        """Draw whether to apply, the order of the four adjustments and their factors."""
        super().randomize(None)
        if not self._do_transform:
            return
        self.order = [int(i) for i in self.R.permutation(4)]
        ranges = (self.brightness, self.contrast, self.saturation, self.hue)
        self.factors = [None if r is None else float(self.R.uniform(r[0], r[1])) for r in ranges]

    def jitter(self, image: torch.Tensor) -> torch.Tensor:
        """Apply the last drawn adjustments to one (3, H, W) 0-255 tensor."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"RandColorJitterd expects a (3, H, W) RGB image, got shape {tuple(image.shape)}")
        functions = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        out = image.clamp(0.0, _MAX)
        for index in self.order:
            factor = self.factors[index]
            if factor is not None:
                out = functions[index](out, factor)
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            tensor = torch.as_tensor(image.as_tensor() if hasattr(image, "as_tensor") else image)
            if not tensor.is_floating_point():
                tensor = tensor.to(torch.float32)
            d[key] = convert_to_dst_type(self.jitter(tensor), image, dtype=tensor.dtype)[0]
        return d
