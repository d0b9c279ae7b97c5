"""SegDiff's noise-prediction network eps(x_t, I, t) = D(E(F(x_t) + G(I), t), t).

F is a conv3x3 from the label channels to the U-Net width C, G the RRDB image encoder (``bundle.networks.rrdb``),
and E/D the encoder and decoder of MONAI's ``DiffusionModelUNet`` whose input convolution is replaced by the
fusion of F(x_t) and G(I) (METHODS.md section 2; tomeramit/SegDiff ``improved_diffusion/unet.py``, where the RRDB
features are added to the output of the first input block).

The image-dependent part, G(I), is computed once per image by ``encode_image`` and passed back as
``image_features`` at every sampling step, so the expensive encoder never runs once per step.

Ablations of the SegDiff paper (``conditioning``):
- ``"sum"`` (the method): F(x_t) + G(I).
- ``"concat"`` (variant one): F(x_t) and G(I) concatenated (2C channels) and mixed back to C by a conv1x1 that
  takes the place of the U-Net input convolution.
- ``"image_concat"`` (variant three, no image encoder): F is a conv3x3 from concat(x_t, I) to C; the "features"
  of an image are the image itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from bundle.networks.blocks import require_2d
from bundle.networks.rrdb import RRDBEncoder

__all__ = ["SegDiffNetwork", "CONDITIONING_MODES"]

CONDITIONING_MODES = ("sum", "concat", "image_concat")


class SegDiffNetwork(nn.Module):
    """SegDiff eps-network. Defaults are the reference MoNuSeg setting (164 M parameters in the reference).

    Args:
        label_channels: channels of x_t and of the predicted noise (1 for a binary mask).
        image_channels: channels of the conditioning image (3 for RGB).
        num_channels: U-Net base width C (128); also the output width of F and G.
        channel_mult: width multipliers per U-Net level; the input side must be divisible by 2**(len - 1).
        num_res_blocks: residual blocks per level on the way down (one more on the way up), 3 in the reference.
        attention_resolutions: feature-map sizes (pixels, for an ``image_size`` input) with self-attention.
        num_heads: attention heads (4 in the reference); every attended width must be divisible by it.
        image_size: nominal input size, only used to place the attention levels (256 for MoNuSeg tiles).
        rrdb_blocks: RRDBs in the image encoder (12 for MoNuSeg in the reference README).
        rrdb_features: RRDB trunk width (64).
        rrdb_growth: RRDB dense-block growth (32).
        conditioning: ``"sum"`` (SegDiff), ``"concat"`` or ``"image_concat"`` (the paper's ablations, see above).
        norm_num_groups: group-norm groups of the U-Net (32); every level width must be divisible by it.
        use_flash_attention: use ``torch.nn.functional.scaled_dot_product_attention`` in the attention blocks.
    """

    def __init__(
        self,
        label_channels: int = 1,
        image_channels: int = 3,
        num_channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 3,
        attention_resolutions: Sequence[int] = (16, 8),
        num_heads: int = 4,
        image_size: int = 256,
        rrdb_blocks: int = 12,
        rrdb_features: int = 64,
        rrdb_growth: int = 32,
        conditioning: str = "sum",
        norm_num_groups: int = 32,
        use_flash_attention: bool = True,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        require_2d("SegDiff", spatial_dims)
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
        channels = [num_channels * m for m in channel_mult]
        level_sizes = [image_size // 2**i for i in range(len(channels))]
        attention_levels = [size in tuple(attention_resolutions) for size in level_sizes]
        if any(c % num_heads for c, a in zip(channels, attention_levels) if a) or channels[-1] % num_heads:
            raise ValueError(f"every attended U-Net width {channels} must be divisible by num_heads={num_heads}")
        self.label_channels = label_channels
        self.image_channels = image_channels
        self.num_channels = num_channels
        self.num_levels = len(channels)
        self.size_divisor = 2 ** (self.num_levels - 1)  # what the input's sides must be a multiple of
        self.conditioning = conditioning

        if conditioning == "image_concat":
            self.label_conv = nn.Conv2d(label_channels + image_channels, num_channels, 3, padding=1)
            self.image_encoder: nn.Module | None = None
        else:
            self.label_conv = nn.Conv2d(label_channels, num_channels, 3, padding=1)
            self.image_encoder = RRDBEncoder(image_channels, num_channels, rrdb_blocks, rrdb_features, rrdb_growth)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=num_channels,
            out_channels=label_channels,
            num_res_blocks=num_res_blocks,
            channels=channels,
            attention_levels=attention_levels,
            norm_num_groups=norm_num_groups,
            num_head_channels=[c // num_heads for c in channels],
            use_flash_attention=use_flash_attention,
        )
        # the fused F(x_t) (+) G(I) takes the place of the U-Net's own input convolution
        self.unet.conv_in = nn.Conv2d(2 * num_channels, num_channels, 1) if conditioning == "concat" else nn.Identity()

    @property
    def feature_channels(self) -> int:
        """Channels of ``encode_image``'s output."""
        return self.image_channels if self.image_encoder is None else self.num_channels

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image features reused at every step: (B, image_channels, H, W) -> (B, feature_channels, H, W).

        G(I) for ``"sum"``/``"concat"``; the image itself for ``"image_concat"``.
        """
        if image.ndim != 4 or image.shape[1] != self.image_channels:
            raise ValueError(f"image must be (B, {self.image_channels}, H, W), got shape {tuple(image.shape)}")
        return image if self.image_encoder is None else self.image_encoder(image)

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if x_t.ndim != 4 or x_t.shape[1] != self.label_channels:
            raise ValueError(f"x_t must be (B, {self.label_channels}, H, W), got shape {tuple(x_t.shape)}")
        factor = 2 ** (self.num_levels - 1)
        if x_t.shape[2] % factor or x_t.shape[3] % factor:
            raise ValueError(f"x_t height and width must be divisible by {factor}, got {tuple(x_t.shape[2:])}")
        expected = (self.feature_channels, *x_t.shape[2:])
        if features.ndim != 4 or tuple(features.shape[1:]) != expected or features.shape[0] not in (1, x_t.shape[0]):
            raise ValueError(
                f"image features must be (B or 1, {expected[0]}, {expected[1]}, {expected[2]}) to match x_t "
                f"{tuple(x_t.shape)}, got {tuple(features.shape)} (is the image the same size as the label?)"
            )
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape ({x_t.shape[0]},) (one timestep per sample), got {tuple(t.shape)}")
        return t

    def fuse(self, x_t: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The U-Net input (B, C, H, W) from x_t (B, label_channels, H, W) and the image features."""
        if self.conditioning == "image_concat":
            return self.label_conv(torch.cat([x_t, features.expand(x_t.shape[0], -1, -1, -1)], dim=1))
        label_features = self.label_conv(x_t)
        if self.conditioning == "concat":
            return torch.cat([label_features, features.expand_as(label_features)], dim=1)
        return label_features + features

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        image: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise of x_t.

        Args:
            x_t: (B, label_channels, H, W) noisy label, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, x0 in {-1, 1}.
            t: (B,) integer time indices in [0, T) (MONAI scheduler convention).
            image: (B, image_channels, H, W) conditioning image, or
            image_features: (B or 1, feature_channels, H, W) from ``encode_image`` (exactly one of the two).

        Returns:
            (B, label_channels, H, W) predicted noise eps (unbounded, about N(0, 1)).
        """
        if (image is None) == (image_features is None):
            raise ValueError("pass exactly one of image or image_features")
        features = self.encode_image(image) if image_features is None else image_features
        t = self._check_inputs(x_t, t, features)
        return self.unet(self.fuse(x_t, features), t)
