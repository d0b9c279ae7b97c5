"""Building blocks shared by the diffusion networks (NCSN++/DDGAN family used by cDAL).

Everything here is per-sample (GroupNorm, no BatchNorm), so a batch of N inputs gives the same result as N
single calls. Every block takes ``spatial_dims`` (2, the papers' networks, or 3 for volumes); the 3-D forms use
the same layers with 3-D convolutions (MONAI's ``Conv`` factory) and the separable FIR kernel in three axes, and
keep the 2-D parameter names. Initialisation follows the score-SDE/DDGAN code: ``variance_scaling(scale,
"fan_avg", "uniform")``
(Xavier-uniform with gain sqrt(scale)) for convolutions and dense layers, zero biases, and exact zeros where the
reference uses ``init_scale=0`` (last conv of each residual branch, attention output, network heads).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv
from torch import nn

__all__ = [
    "conv_nd",
    "conv_type",
    "out_of_place_arithmetic",
    "require_2d",
    "sinusoidal_timestep_embedding",
    "TimestepEmbedding",
    "LatentMappingNetwork",
    "AdaptiveGroupNorm",
    "FIRDownsample",
    "FIRUpsample",
    "BigGANResBlock",
    "SelfAttention2d",
    "PlainResBlock",
    "DownConvBlock",
]

FIR_TAPS = (1.0, 3.0, 3.0, 1.0)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Score-SDE ``default_init``: uniform with variance scale / fan_avg; exact zeros when ``scale == 0``."""
    if scale == 0:
        return nn.init.zeros_(weight)
    return nn.init.xavier_uniform_(weight, gain=math.sqrt(scale))


def conv_nd(
    in_channels: int, out_channels: int, kernel_size: int, init_scale: float = 1.0, spatial_dims: int = 2, **kwargs
) -> nn.Module:
    """``nn.Conv2d`` / ``nn.Conv3d`` ('same' padding unless given), variance-scaling weights and a zero bias."""
    kwargs.setdefault("padding", kernel_size // 2)
    conv = conv_type(spatial_dims)(in_channels, out_channels, kernel_size, **kwargs)
    variance_scaling_(conv.weight, init_scale)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def conv2d(in_channels: int, out_channels: int, kernel_size: int, init_scale: float = 1.0, **kwargs) -> nn.Module:
    """:func:`conv_nd` in 2-D."""
    return conv_nd(in_channels, out_channels, kernel_size, init_scale, 2, **kwargs)


def require_2d(network: str, spatial_dims: int) -> None:
    """Refuse ``spatial_dims`` other than 2 for a network that exists in 2-D only, naming what is 3-D."""
    if int(spatial_dims) != 2:
        raise ValueError(
            f"{network} is a 2-D network (spatial_dims 2), got spatial_dims {spatial_dims}; the 3-D variants are "
            "cdal and unet (--spatial_dims 3), and every slice-wise method takes 2.5-D context (--context_slices k)"
        )


def conv_type(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d`` (MONAI's ``Conv`` factory), refusing other dimensions."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return Conv[Conv.CONV, spatial_dims]


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, C) -> (B, C, 1, ...) broadcastable against ``like`` (B, C, *spatial)."""
    return values.reshape(*values.shape, *([1] * (like.ndim - values.ndim)))


_IN_PLACE = [True]  # the blocks' sums and activations in place (see out_of_place_arithmetic)


@contextlib.contextmanager
def out_of_place_arithmetic() -> Iterator[None]:
    """Within this context the blocks compute every sum, affine map and activation into a new tensor, as they
    did before the in-place forms (the same values; about 10 % slower on a CPU): the path before the change that
    ``tools/benchmark_serving.py`` times as its baseline, and a debugging aid. Not thread-safe."""
    previous, _IN_PLACE[0] = _IN_PLACE[0], False
    try:
        yield
    finally:
        _IN_PLACE[0] = previous


def _add_into(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``fresh + other``, in place in ``fresh`` (a tensor the caller has just made) where its dtype holds the sum
    (under autocast a bf16 ``fresh`` plus a float32 ``other`` stays a new float32 tensor, as ``+`` gives)."""
    if _IN_PLACE[0] and fresh.dtype == torch.promote_types(fresh.dtype, other.dtype):
        return fresh.add_(other)
    return fresh + other


def _silu(fresh: torch.Tensor) -> torch.Tensor:
    """SiLU, in place in ``fresh`` (a tensor the caller has just made)."""
    return F.silu(fresh, inplace=_IN_PLACE[0])


def _scale(fresh: torch.Tensor, factor: float) -> torch.Tensor:
    """``fresh * factor``, in place in ``fresh`` (a tensor the caller has just made)."""
    return fresh.mul_(factor) if _IN_PLACE[0] else fresh * factor


def dense(in_features: int, out_features: int, init_scale: float = 1.0) -> nn.Linear:
    """``nn.Linear`` with variance-scaling weights and a zero bias (DDGAN ``dense``)."""
    layer = nn.Linear(in_features, out_features)
    variance_scaling_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def default_num_groups(channels: int) -> int:
    """Group count of the NCSN++ norms: min(C // 4, 32), at least 1."""
    return max(1, min(channels // 4, 32))


def sinusoidal_timestep_embedding(
    timesteps: torch.Tensor, embedding_dim: int, max_positions: int = 10000
) -> torch.Tensor:
    """Sinusoidal embedding of integer (or real) timesteps, laid out as in score-SDE/DDGAN.

    ``[sin(t * f_k), cos(t * f_k)]`` with f_k = max_positions^(-k / (half - 1)), k = 0..half-1. This differs from
    MONAI's ``get_timestep_embedding`` (cos first, exponent k / half) only in layout, and keeps the reference
    weights' meaning.

    Args:
        timesteps: (B,) timesteps (any numeric dtype).
        embedding_dim: output size D.

    Returns:
        (B, D) float32 embedding in [-1, 1] (zero-padded when D is odd).
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (B,), got shape {tuple(timesteps.shape)}")
    half = embedding_dim // 2
    exponent = math.log(max_positions) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device) * -exponent)
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding followed by dense -> activation -> dense.

    Generator (NCSN++): ``TimestepEmbedding(nf, 4 nf, 4 nf, nn.SiLU())``; discriminator (DDGAN):
    ``TimestepEmbedding(t_emb_dim, t_emb_dim, t_emb_dim, nn.LeakyReLU(0.2))``.

    Args:
        embedding_dim: size of the sinusoidal embedding.
        hidden_dim: width of the hidden layer.
        output_dim: output size.
        activation: the nonlinearity between the two dense layers.
    """

    def __init__(self, embedding_dim: int, hidden_dim: int, output_dim: int, activation: nn.Module) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.mlp = nn.Sequential(dense(embedding_dim, hidden_dim), activation, dense(hidden_dim, output_dim))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) timesteps -> (B, output_dim) embedding (no final activation)."""
        return self.mlp(sinusoidal_timestep_embedding(timesteps, self.embedding_dim))


class PixelNorm(nn.Module):
    """Normalise each latent vector to unit root-mean-square: z / sqrt(mean(z^2) + 1e-8), per sample."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z / torch.sqrt(torch.mean(z**2, dim=1, keepdim=True) + 1e-8)


class LatentMappingNetwork(nn.Sequential):
    """StyleGAN-like mapping z -> z_emb: PixelNorm -> dense(nz, z_emb) -> SiLU -> n_mlp x [dense -> SiLU].

    Args:
        nz: latent size (paper: 100).
        z_emb_dim: embedding size (paper: 256).
        n_mlp: number of extra dense layers (paper: 3, i.e. 4 dense layers in all).

    Input (B, nz), any real values (normally N(0, I)); output (B, z_emb_dim), SiLU range (> -0.28).
    """

    def __init__(self, nz: int = 100, z_emb_dim: int = 256, n_mlp: int = 3) -> None:
        layers: list[nn.Module] = [PixelNorm(), dense(nz, z_emb_dim), nn.SiLU()]
        for _ in range(n_mlp):
            layers += [dense(z_emb_dim, z_emb_dim), nn.SiLU()]
        super().__init__(*layers)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine parameters, then a latent-dependent affine: gamma(z) * h + beta(z).

    (gamma, beta) = dense(z_emb -> 2C), with the bias initialised to gamma = 1, beta = 0.

    Args:
        num_channels: C.
        style_dim: size of the latent embedding z_emb.
        num_groups: defaults to min(C // 4, 32).
        eps: GroupNorm epsilon (reference: 1e-6).
    """

    def __init__(self, num_channels: int, style_dim: int, num_groups: int | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(num_groups or default_num_groups(num_channels), num_channels, eps=eps, affine=False)
        self.style = dense(style_dim, 2 * num_channels)
        with torch.no_grad():
            self.style.bias[:num_channels] = 1.0
            self.style.bias[num_channels:] = 0.0

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """x (B, C, *spatial), style (B, style_dim) -> (B, C, *spatial)."""
        gamma, beta = _expand(self.style(style), x).chunk(2, dim=1)
        if _IN_PLACE[0]:
            return torch.addcmul(beta, self.norm(x), gamma)  # gamma * norm(x) + beta in one pass
        return gamma * self.norm(x) + beta


def _fir_kernel(taps: tuple[float, ...], spatial_dims: int = 2) -> torch.Tensor:
    if len(taps) % 2 != 0:
        raise ValueError(f"FIR taps must have even length, got {taps}")
    k1 = torch.tensor(taps, dtype=torch.float32)
    k = k1
    for _ in range(spatial_dims - 1):
        k = k[..., None] * k1
    return k / k.sum()


def _depthwise(x: torch.Tensor, kernel: torch.Tensor, transpose: bool = False, **kwargs) -> torch.Tensor:
    """The FIR ``kernel`` (1, 1, *k) applied to every channel of ``x`` (B, C, *spatial) on its own."""
    channels, dims = x.shape[1], x.ndim - 2
    weight = kernel.to(x.dtype).expand(channels, 1, *kernel.shape[2:])
    op = getattr(F, f"conv_transpose{dims}d" if transpose else f"conv{dims}d")
    return op(x, weight, groups=channels, **kwargs)


class FIRDownsample(nn.Module):
    """Factor-2 downsampling with the separable FIR kernel [1, 3, 3, 1] (score-SDE ``downsample_2d``).

    Without a conv: depthwise blur with stride 2. With a conv (``with_conv=True``, score-SDE
    ``conv_downsample_2d``): blur at full resolution, then a 3x3 stride-2 conv in_channels -> out_channels.

    Input (B, C, H, W) -> (B, C_out, H/2, W/2) for even H, W (and D with ``spatial_dims=3``).
    """

    def __init__(
        self,
        in_channels: int | None = None,
        out_channels: int | None = None,
        with_conv: bool = False,
        taps: tuple[float, ...] = FIR_TAPS,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        kernel = _fir_kernel(taps, spatial_dims).flip(tuple(range(spatial_dims)))
        self.register_buffer("kernel", kernel[None, None], persistent=False)
        self.conv: nn.Module | None = None
        if with_conv:
            if in_channels is None:
                raise ValueError("FIRDownsample(with_conv=True) needs in_channels")
            self.conv = conv_nd(in_channels, out_channels or in_channels, 3, 1.0, spatial_dims, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.kernel.shape[-1]
        if self.conv is None:
            return _depthwise(x, self.kernel, stride=2, padding=(taps - 2) // 2)
        return self.conv(_depthwise(x, self.kernel, padding=taps // 2))


class FIRUpsample(nn.Module):
    """Factor-2 upsampling with the FIR kernel [1, 3, 3, 1] (score-SDE ``upsample_2d``), optionally + conv3x3.

    The upsampling is a depthwise transposed convolution with the kernel scaled by 4 (gain 1). With
    ``with_conv=True`` a 3x3 conv in_channels -> out_channels follows (score-SDE fuses the two; unused by cDAL).

    Input (B, C, H, W) -> (B, C_out, 2H, 2W) (and 2D with ``spatial_dims=3``, the kernel scaled by 8).
    """

    def __init__(
        self,
        in_channels: int | None = None,
        out_channels: int | None = None,
        with_conv: bool = False,
        taps: tuple[float, ...] = FIR_TAPS,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        self.register_buffer("kernel", (_fir_kernel(taps, spatial_dims) * 2.0**spatial_dims)[None, None], False)
        self.conv: nn.Module | None = None
        if with_conv:
            if in_channels is None:
                raise ValueError("FIRUpsample(with_conv=True) needs in_channels")
            self.conv = conv_nd(in_channels, out_channels or in_channels, 3, 1.0, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.kernel.shape[-1]
        x = _depthwise(x, self.kernel, transpose=True, stride=2, padding=(taps - 2) // 2)
        return x if self.conv is None else self.conv(x)


class BigGANResBlock(nn.Module):
    """NCSN++ BigGAN residual block with adaptive group norm (DDGAN ``ResnetBlockBigGANpp_Adagn``).

    h = SiLU(AdaGN_0(x, z)) -> [FIR up/down] -> conv3x3 -> + dense(SiLU(temb)) -> SiLU(AdaGN_1(h, z)) -> dropout ->
    conv3x3 (zero init); skip = [FIR up/down](x) -> conv1x1 when channels change or resampling;
    out = (skip + h) / sqrt 2.

    Args:
        in_channels / out_channels: channel counts (out defaults to in).
        temb_dim: size of the time embedding (4 nf).
        zemb_dim: size of the latent embedding.
        up / down: FIR-upsample or downsample by 2 inside the block.
        dropout: dropout probability before the last conv.
        spatial_dims: 2 or 3.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        temb_dim: int,
        zemb_dim: int,
        up: bool = False,
        down: bool = False,
        dropout: float = 0.0,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("BigGANResBlock cannot both upsample and downsample")
        out_channels = out_channels or in_channels
        dims = spatial_dims
        self.norm_0 = AdaptiveGroupNorm(in_channels, zemb_dim)
        self.conv_0 = conv_nd(in_channels, out_channels, 3, spatial_dims=dims)
        self.temb_proj = dense(temb_dim, out_channels)
        self.norm_1 = AdaptiveGroupNorm(out_channels, zemb_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv_1 = conv_nd(out_channels, out_channels, 3, init_scale=0.0, spatial_dims=dims)
        self.resample: nn.Module | None = (
            FIRUpsample(spatial_dims=dims) if up else FIRDownsample(spatial_dims=dims) if down else None
        )
        resampled = in_channels != out_channels or up or down
        self.skip = conv_nd(in_channels, out_channels, 1, spatial_dims=dims) if resampled else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, zemb: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, *spatial), temb (B, temb_dim), zemb (B, zemb_dim) -> (B, C_out, *spatial').

        The activations, the time-embedding sum and the skip sum work in place on tensors this block has just
        made (never on ``x``): fewer passes over memory, about 10 % of a CPU forward; autograd-safe.
        """
        h = _silu(self.norm_0(x, zemb))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = _add_into(self.conv_0(h), _expand(self.temb_proj(F.silu(temb)), h))
        h = self.conv_1(self.dropout(_silu(self.norm_1(h, zemb))))
        if self.skip is not None:
            x = self.skip(x)
        return _scale(_add_into(h, x), _INV_SQRT2)


class SelfAttention2d(nn.Module):
    """Single-head spatial self-attention (score-SDE ``AttnBlockpp`` with skip rescaling).

    GroupNorm(min(C/4, 32), eps 1e-6) -> q, k, v by 1x1 convs -> softmax(q k^T / sqrt C) v -> 1x1 conv (zero init);
    out = (x + h) / sqrt 2. Input and output (B, C, H, W) (or (B, C, H, W, D) with ``spatial_dims=3``).
    """

    def __init__(self, channels: int, spatial_dims: int = 2) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(default_num_groups(channels), channels, eps=1e-6)
        self.qkv = conv_nd(channels, 3 * channels, 1, spatial_dims=spatial_dims)
        with torch.no_grad():  # q, k and v each initialised like the reference's NIN (scale 0.1)
            for weight in self.qkv.weight.chunk(3, dim=0):
                variance_scaling_(weight, 0.1)
        self.proj_out = conv_nd(channels, channels, 1, init_scale=0.0, spatial_dims=spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, 1, channels, -1).transpose(-1, -2)
        q, k, v = qkv.unbind(dim=1)  # each (B, 1 head, HW, C): the 4-D form every exporter (ONNX) supports
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(batch, channels, *spatial)
        return _scale(_add_into(self.proj_out(h), x), _INV_SQRT2)


class PlainResBlock(nn.Module):
    """Residual block without time or latent conditioning (cDAL image encoder, guided-diffusion style).

    GN -> SiLU -> conv3x3 -> GN -> SiLU -> dropout -> conv3x3 (zero init); identity skip (no rescaling).
    GroupNorm uses 32 groups when C is a multiple of 32, else min(C/4, 32). Input and output (B, C, *spatial).
    """

    def __init__(self, channels: int, dropout: float = 0.0, spatial_dims: int = 2) -> None:
        super().__init__()
        groups = 32 if channels % 32 == 0 else default_num_groups(channels)
        conv = conv_type(spatial_dims)
        self.layers = nn.Sequential(
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            conv(channels, channels, 3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            conv(channels, channels, 3, padding=1),
        )
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class DownConvBlock(nn.Module):
    """DDGAN discriminator block: act -> conv3x3 -> + dense(temb) -> act -> [FIR down] -> conv3x3;
    skip = [FIR down](x) -> conv1x1 (no bias); out = (h + skip) / sqrt 2.

    Args:
        in_channels / out_channels: channel counts.
        t_emb_dim: size of the (already activated) time embedding.
        downsample: halve the resolution.
        negative_slope: LeakyReLU slope (0.2).
        spatial_dims: 2 or 3.

    Input (B, C_in, H, W), temb (B, t_emb_dim) -> (B, C_out, H/2, W/2) (or H, W without downsampling).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        t_emb_dim: int,
        downsample: bool = True,
        negative_slope: float = 0.2,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        dims = spatial_dims
        self.act = nn.LeakyReLU(negative_slope)
        self.conv_0 = conv_nd(in_channels, out_channels, 3, spatial_dims=dims)
        self.temb_proj = dense(t_emb_dim, out_channels)
        self.conv_1 = conv_nd(out_channels, out_channels, 3, init_scale=0.0, spatial_dims=dims)
        self.downsample = FIRDownsample(spatial_dims=dims) if downsample else None
        self.skip = conv_nd(in_channels, out_channels, 1, spatial_dims=dims, bias=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv_0(self.act(x)) + _expand(self.temb_proj(temb), x))
        if self.downsample is not None:
            h, x = self.downsample(h), self.downsample(x)
        return (self.conv_1(h) + self.skip(x)) * _INV_SQRT2
