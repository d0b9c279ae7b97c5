"""cDAL networks: the x0-predicting NCSN++ generator with latent z and image encoder, and the DDGAN discriminator.

Architecture of Hejrati/cDAL (``score_sde/models/ncsnpp_generator_adagn.py``, ``discriminator.py``); see
METHODS.md section 1.3. Labels are in [-1, 1]; images are normalised intensities.

``spatial_dims=3`` builds the same networks with 3-D convolutions for volume patches (B, C, H, W, D): the
extension past the paper's 2-D slices (its stated limit). The discriminator's feature maps are then 3-D, and so
is the attention map of the generator's loss (``bundle.engines.steps.cdal.attention_map``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bundle.networks.blocks import (
    BigGANResBlock,
    DownConvBlock,
    FIRDownsample,
    LatentMappingNetwork,
    PlainResBlock,
    SelfAttention2d,
    TimestepEmbedding,
    _silu,
    conv_nd,
    conv_type,
    default_num_groups,
    dense,
)

__all__ = ["CDALGenerator", "CDALDiscriminator", "CDALImageEncoder"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def _check_timesteps(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},) (one timestep per sample), got {tuple(t.shape)}")
    return t


class CDALImageEncoder(nn.Sequential):
    """Image encoder G(I): conv3x3(image_channels -> nf) + num_layers x num_res_blocks ``PlainResBlock`` at full
    resolution, without time or latent conditioning.

    Input (B, image_channels, H, W) -> (B, nf, H, W) (or H, W, D with ``spatial_dims=3``).
    """

    def __init__(
        self,
        image_channels: int = 3,
        num_channels: int = 64,
        num_layers: int = 5,
        num_res_blocks: int = 1,
        dropout: float = 0.0,
        spatial_dims: int = 2,
    ) -> None:
        blocks = [PlainResBlock(num_channels, dropout, spatial_dims) for _ in range(num_layers * num_res_blocks)]
        super().__init__(conv_type(spatial_dims)(image_channels, num_channels, 3, padding=1), *blocks)


class CDALGenerator(nn.Module):
    """cDAL generator: NCSN++ U-Net predicting x0 from (x_t, t, z, image), output in (-1, 1) by tanh.

    BigGAN residual blocks with adaptive group norm driven by the latent mapping network, sinusoidal time
    embedding (dim nf -> 4 nf MLP) added after each block's first conv, FIR resampling, skip rescaling by 1/sqrt 2,
    single-head attention at ``attention_resolutions``, the "residual" input pyramid of x_t. The image encoder output
    is added to conv3x3(x_t) before the first residual block (and so enters the first skip as well).
    Defaults are the paper's MoNuSeg setting (41.7 M parameters in the reference).

    Args:
        label_channels: channels of x_t and of the output x0 (1 for a binary mask).
        image_channels: channels of the conditioning image (3 for RGB).
        num_channels: base width nf.
        channel_mult: width multipliers per resolution level; the input must be divisible by 2**(len - 1).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: feature-map sizes (pixels, for an ``image_size`` input) that get self-attention.
        image_size: nominal input size, used only to place the attention levels.
        cond_enc_layers / cond_enc_num_res_blocks: image encoder depth (layers x blocks per layer).
        nz: latent size; z_emb_dim: latent embedding size; n_mlp: extra dense layers of the mapping network.
        dropout: dropout in the residual blocks.
        progressive_input: "residual" (FIR-conv-downsampled x_t pyramid summed at each downsampling, /sqrt 2)
            or "none".
        spatial_dims: 2 (slices, images) or 3 (volume patches (B, C, H, W, D); attention is costly in 3-D: a
            32^3 patch has 4096 positions at 16^3).
    """

    def __init__(
        self,
        label_channels: int = 1,
        image_channels: int = 3,
        num_channels: int = 64,
        channel_mult: Sequence[int] = (1, 1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16, 8),
        image_size: int = 256,
        cond_enc_layers: int = 5,
        cond_enc_num_res_blocks: int = 1,
        nz: int = 100,
        z_emb_dim: int = 256,
        n_mlp: int = 3,
        dropout: float = 0.0,
        progressive_input: str = "residual",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if progressive_input not in ("residual", "none"):
            raise ValueError(f"progressive_input must be 'residual' or 'none', got {progressive_input!r}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        nf, levels, dims = num_channels, len(channel_mult), spatial_dims
        self.spatial_dims = dims
        self.label_channels, self.image_channels, self.num_channels = label_channels, image_channels, nf
        self.nz, self.num_levels = nz, levels
        self.size_divisor = 2 ** (levels - 1)  # what the input's sides must be a multiple of
        self.progressive_input = progressive_input
        level_sizes = [image_size // 2**i for i in range(levels)]
        use_attention = [size in tuple(attention_resolutions) for size in level_sizes]
        temb_dim = 4 * nf

        def res_block(c_in: int, c_out: int | None = None, **kwargs) -> BigGANResBlock:
            return BigGANResBlock(
                c_in, c_out, temb_dim=temb_dim, zemb_dim=z_emb_dim, dropout=dropout, spatial_dims=dims, **kwargs
            )

        def attention_or_identity(level: int, channels: int) -> nn.Module:
            return SelfAttention2d(channels, dims) if use_attention[level] else nn.Identity()

        self.time_embedding = TimestepEmbedding(nf, temb_dim, temb_dim, nn.SiLU())
        self.latent_mapping = LatentMappingNetwork(nz, z_emb_dim, n_mlp)
        self.image_encoder = CDALImageEncoder(
            image_channels, nf, cond_enc_layers, cond_enc_num_res_blocks, dropout, spatial_dims=dims
        )
        self.input_conv = conv_nd(label_channels, nf, 3, spatial_dims=dims)

        # encoder path
        skip_channels, in_ch, pyramid_ch = [nf], nf, label_channels
        self.down_blocks, self.down_attention = nn.ModuleList(), nn.ModuleList()
        self.downsamplers, self.pyramid_downsamplers = nn.ModuleList(), nn.ModuleList()
        for level in range(levels):
            blocks, attentions = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(res_block(in_ch, nf * channel_mult[level]))
                in_ch = nf * channel_mult[level]
                attentions.append(attention_or_identity(level, in_ch))
                skip_channels.append(in_ch)
            self.down_blocks.append(blocks)
            self.down_attention.append(attentions)
            if level < levels - 1:
                self.downsamplers.append(res_block(in_ch, down=True))
                if progressive_input == "residual":
                    self.pyramid_downsamplers.append(FIRDownsample(pyramid_ch, in_ch, True, spatial_dims=dims))
                    pyramid_ch = in_ch
                skip_channels.append(in_ch)

        self.mid_block_0 = res_block(in_ch)
        self.mid_attention = SelfAttention2d(in_ch, dims)
        self.mid_block_1 = res_block(in_ch)

        # decoder path (levels in reverse order)
        self.up_blocks, self.up_attention, self.upsamplers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(levels)):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(res_block(in_ch + skip_channels.pop(), nf * channel_mult[level]))
                in_ch = nf * channel_mult[level]
            self.up_blocks.append(blocks)
            self.up_attention.append(attention_or_identity(level, in_ch))
            if level > 0:
                self.upsamplers.append(res_block(in_ch, up=True))

        self.head_norm = nn.GroupNorm(default_num_groups(in_ch), in_ch, eps=1e-6)
        self.head_conv = conv_nd(in_ch, label_channels, 3, init_scale=0.0, spatial_dims=dims)

    @property
    def _axes(self) -> str:
        return "H, W" if self.spatial_dims == 2 else "H, W, D"

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image features to reuse across steps and generations: (B, image_channels, H, W) -> (B, nf, H, W)."""
        if image.ndim != 2 + self.spatial_dims or image.shape[1] != self.image_channels:
            raise ValueError(f"image must be (B, {self.image_channels}, {self._axes}), got shape {tuple(image.shape)}")
        return self.image_encoder(image)

    def _check_inputs(self, x_t: torch.Tensor, z: torch.Tensor, features: torch.Tensor) -> None:
        if x_t.ndim != 2 + self.spatial_dims or x_t.shape[1] != self.label_channels:
            raise ValueError(f"x_t must be (B, {self.label_channels}, {self._axes}), got shape {tuple(x_t.shape)}")
        factor = 2 ** (self.num_levels - 1)
        if any(size % factor for size in x_t.shape[2:]):
            raise ValueError(f"x_t's {self._axes} must be divisible by {factor}, got {tuple(x_t.shape[2:])}")
        if z.shape != (x_t.shape[0], self.nz):
            raise ValueError(f"z must have shape ({x_t.shape[0]}, {self.nz}), got {tuple(z.shape)}")
        expected = (self.num_channels, *x_t.shape[2:])
        if (
            features.ndim != x_t.ndim
            or tuple(features.shape[1:]) != expected
            or features.shape[0] not in (1, x_t.shape[0])
        ):
            shown = ", ".join(str(v) for v in expected)
            raise ValueError(
                f"image features must be (B or 1, {shown}) to match x_t "
                f"{tuple(x_t.shape)}, got {tuple(features.shape)} (is the image the same size as the label?)"
            )

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        image: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict x0.

        Args:
            x_t: (B, label_channels, H, W) noisy label (about [-1, 1] scaled).
            t: (B,) integer timesteps in [0, T).
            z: (B, nz) latent, normally N(0, I).
            image: (B, image_channels, H, W) conditioning image, or
            image_features: (B or 1, nf, H, W) from ``encode_image`` (exactly one of the two).

        Returns:
            (B, label_channels, H, W) predicted x0 in (-1, 1).
        """
        if (image is None) == (image_features is None):
            raise ValueError("pass exactly one of image or image_features")
        features = self.encode_image(image) if image_features is None else image_features
        self._check_inputs(x_t, z, features)
        t = _check_timesteps(t, x_t.shape[0])
        temb = self.time_embedding(t)
        zemb = self.latent_mapping(z)

        h = self.input_conv(x_t) + features
        skips, pyramid = [h], x_t
        for level in range(self.num_levels):
            for block, attention in zip(self.down_blocks[level], self.down_attention[level]):
                h = attention(block(h, temb, zemb))
                skips.append(h)
            if level < self.num_levels - 1:
                h = self.downsamplers[level](h, temb, zemb)
                if self.progressive_input == "residual":
                    pyramid = (self.pyramid_downsamplers[level](pyramid) + h) * _INV_SQRT2
                    h = pyramid
                skips.append(h)

        h = self.mid_block_1(self.mid_attention(self.mid_block_0(h, temb, zemb)), temb, zemb)

        for i, (blocks, attention) in enumerate(zip(self.up_blocks, self.up_attention)):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), temb, zemb)
            h = attention(h)
            if i < len(self.upsamplers):
                h = self.upsamplers[i](h, temb, zemb)

        return torch.tanh(self.head_conv(_silu(self.head_norm(h))))


class CDALDiscriminator(nn.Module):
    """Time-conditioned DDGAN discriminator on (x_t, x_{t+1}) pairs, with feature taps for cDAL's attention.

    concat(x_t, x_{t+1}) -> conv1x1 (-> 2 ngf) -> one ``DownConvBlock`` per entry of ``channel_mult`` (out
    channels ngf * mult, FIR downsampling) -> minibatch stddev (groups of up to 4) -> conv3x3 -> LeakyReLU(0.2) ->
    spatial sum -> linear -> logit. Time embedding: sinusoidal -> dense -> LReLU -> dense, then LReLU. All convs are
    re-initialised N(0, 0.02) as in cDAL (MoNuSeg/CXR).

    Defaults are DDGAN ``Discriminator_large`` (6 blocks). DDGAN ``Discriminator_small`` is
    ``channel_mult=(2, 4, 8, 8), downsample_first=False``.

    Args:
        label_channels: channels of each of x_t and x_{t+1}.
        ngf: base width.
        t_emb_dim: time-embedding size.
        channel_mult: output width (x ngf) of each DownConvBlock.
        downsample_first: whether the first block halves the resolution (False in ``Discriminator_small``).
        conv_init_std: std of the N(0, std) conv re-initialisation; None keeps the DDGAN variance-scaling init.
        spatial_dims: 2 or 3 (pairs of label volumes (B, C, H, W, D); the feature maps are then 3-D).
    """

    stddev_group = 4

    def __init__(
        self,
        label_channels: int = 1,
        ngf: int = 64,
        t_emb_dim: int = 128,
        channel_mult: Sequence[int] = (4, 8, 8, 8, 8, 8),
        downsample_first: bool = True,
        conv_init_std: float | None = 0.02,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.label_channels, self.spatial_dims = label_channels, spatial_dims
        dims = spatial_dims
        self.act = nn.LeakyReLU(0.2)
        self.time_embedding = TimestepEmbedding(t_emb_dim, t_emb_dim, t_emb_dim, nn.LeakyReLU(0.2))
        self.start_conv = conv_nd(2 * label_channels, 2 * ngf, 1, spatial_dims=dims)
        in_ch = 2 * ngf
        self.blocks = nn.ModuleList()
        for i, mult in enumerate(channel_mult):
            down = downsample_first or i > 0
            self.blocks.append(DownConvBlock(in_ch, ngf * mult, t_emb_dim, downsample=down, spatial_dims=dims))
            in_ch = ngf * mult
        self.num_downsamplings = len(channel_mult) - (0 if downsample_first else 1)
        self.final_conv = conv_nd(in_ch + 1, in_ch, 3, spatial_dims=dims)
        self.end_linear = dense(in_ch, 1)
        if conv_init_std is not None:
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                    nn.init.normal_(module.weight, 0.0, conv_init_std)

    def _embed(self, x_t: torch.Tensor, t: torch.Tensor, x_tp1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x_t.ndim != 2 + self.spatial_dims or x_t.shape[1] != self.label_channels or x_tp1.shape != x_t.shape:
            axes = "H, W" if self.spatial_dims == 2 else "H, W, D"
            raise ValueError(
                f"x_t and x_tp1 must both be (B, {self.label_channels}, {axes}), got {tuple(x_t.shape)} and "
                f"{tuple(x_tp1.shape)}"
            )
        minimum = 2**self.num_downsamplings
        if min(x_t.shape[2:]) < minimum:
            raise ValueError(
                f"discriminator input must be at least {minimum} pixels per side, got {tuple(x_t.shape[2:])}"
            )
        t = _check_timesteps(t, x_t.shape[0])
        return self.start_conv(torch.cat([x_t, x_tp1], dim=1)), self.act(self.time_embedding(t))

    def get_features(self, x_t: torch.Tensor, t: torch.Tensor, x_tp1: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps [start, block_1, ..., block_K] (the reference's ``hs``).

        For a 256^2 input with the default 6 blocks: [2ngf@256, 4ngf@128, 8ngf@64, 8ngf@32, 8ngf@16, 8ngf@8, 8ngf@4].
        Gradients are kept; cDAL calls it under ``torch.no_grad()`` with D frozen.
        """
        h, temb = self._embed(x_t, t, x_tp1)
        features = [h]
        for block in self.blocks:
            h = block(h, temb)
            features.append(h)
        return features

    def _minibatch_stddev(self, h: torch.Tensor) -> torch.Tensor:
        """Append one channel: the std over groups of samples (i, i + B/G, ...), averaged over C and space."""
        batch, channels, *spatial = h.shape
        group = max(g for g in range(1, min(batch, self.stddev_group) + 1) if batch % g == 0)
        std = torch.sqrt(h.reshape(group, -1, channels, *spatial).var(0, unbiased=False) + 1e-8)
        std = std.mean(dim=tuple(range(1, std.ndim)), keepdim=True).repeat(group, 1, *spatial)
        return torch.cat([h, std], dim=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, x_tp1: torch.Tensor) -> torch.Tensor:
        """Real/fake logits (B, 1) for x_t (B, label_channels, H, W) given x_{t+1} (same shape) and t (B,)."""
        h = self.get_features(x_t, t, x_tp1)[-1]
        h = self.act(self.final_conv(self._minibatch_stddev(h)))
        return self.end_linear(h.sum(dim=tuple(range(2, h.ndim))))
