"""Reduced-precision and channels-last network calls for inference, with the sampler's arithmetic kept in fp32.

``AutocastNetwork`` runs a network's ``forward``, ``encode_image`` and ``sample_rows`` under ``torch.autocast``
and hands every floating-point result back in fp32, so a sampler's update arithmetic (the diffusion step, the
ensemble mean) is never done in bf16/fp16. It is the one place where inference autocast happens: the ensemble
inferer wraps the network in it when its ``autocast`` option is set.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bundle.runtime import FALSE, TRUE, as_bool, unwrap_network

__all__ = [
    "AutocastNetwork",
    "ChannelsLastNetwork",
    "autocast_dtype",
    "native_bf16",
    "precision_name",
    "resolve_autocast",
    "to_channels_last",
    "to_float32",
]

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


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA device with bf16, or an x86 CPU with AMX or AVX-512 BF16
    (detected at run time; elsewhere bf16 is emulated and slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


def resolve_autocast(value: str | torch.dtype | bool | None, device: torch.device | str) -> torch.dtype | None:
    """``autocast_dtype`` of ``value``, where ``"auto"`` is bf16 on a device with native bf16 and full precision
    elsewhere."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    return autocast_dtype(value)


def precision_name(value: str | torch.dtype | bool | None, device: torch.device | str) -> str:
    """The network precision ``value`` gives on ``device``: "bfloat16", "float16" or "float32" (MLflow params)."""
    dtype = resolve_autocast(value, device)
    return "float32" if dtype is None else str(dtype).replace("torch.", "")


def to_float32(value: Any) -> Any:
    """Floating-point tensors (also inside tuples, lists and dicts) as fp32; everything else unchanged."""
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_float32(v) for v in value)
    return value


class AutocastNetwork(nn.Module):
    """``network`` whose calls run under ``torch.autocast(dtype)`` and return fp32 (module docstring).

    Other attributes (``nz``, ``label_channels``, ...) are read from the unwrapped network.
    """

    def __init__(self, network: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.network = network
        self.dtype = dtype

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(unwrap_network(super().__getattr__("network")), name)

    def _run(self, function, like: torch.Tensor, *args, **kwargs) -> Any:
        with torch.autocast(device_type=like.device.type, dtype=self.dtype):
            return to_float32(function(*args, **kwargs))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> Any:
        return self._run(self.network, x, x, *args, **kwargs)

    def encode_image(self, image: torch.Tensor) -> Any:
        return self._run(unwrap_network(self.network).encode_image, image, image)

    def sample_rows(self, condition: Any, *args, **kwargs) -> Any:
        like = condition if torch.is_tensor(condition) else next(t for t in condition if torch.is_tensor(t))
        return self._run(unwrap_network(self.network).sample_rows, like, condition, *args, **kwargs)


def to_channels_last(value: Any) -> Any:
    """4-D / 5-D floating-point tensors (also inside tuples, lists and dicts) in channels-last memory format."""
    if torch.is_tensor(value) and value.is_floating_point() and value.ndim in (4, 5):
        return value.contiguous(memory_format=torch.channels_last if value.ndim == 4 else torch.channels_last_3d)
    if isinstance(value, dict):
        return {k: to_channels_last(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_channels_last(v) for v in value)
    return value


class ChannelsLastNetwork(AutocastNetwork):
    """``network`` whose calls get their image-shaped inputs in channels-last (NHWC / NDHWC) memory format.

    The values are unchanged (same numbers, another layout); oneDNN's CPU convolutions run 1.3-2x faster on
    NHWC inputs at the small windows of slice-wise inference (docs/benchmarks.md). The weights are not touched.
    ``dtype`` None keeps full precision; a dtype also autocasts, as ``AutocastNetwork``.
    """

    def __init__(self, network: nn.Module, dtype: torch.dtype | None = None) -> None:
        super().__init__(network, dtype)

    def _run(self, function, like: torch.Tensor, *args, **kwargs) -> Any:
        args, kwargs = to_channels_last(args), to_channels_last(kwargs)
        if self.dtype is None:
            return function(*args, **kwargs)
        return super()._run(function, like, *args, **kwargs)
