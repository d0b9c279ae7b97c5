"""RRDB image encoder of SegDiff (the ESRGAN "residual-in-residual dense block" trunk).

Architecture of tomeramit/SegDiff ``improved_diffusion/RRDB.py`` (METHODS.md section 2): conv3x3(image -> nf),
``num_blocks`` x RRDB, conv3x3 trunk conv added back to the first features, then conv3x3 -> LeakyReLU(0.2) ->
conv3x3(nf -> out_channels). Every layer keeps the full input resolution. Each RRDB is three five-convolution
dense blocks (growth ``gc``), each block's output scaled by 0.2 and added to its input, and the three-block chain
again scaled by 0.2 and added to the RRDB input. Convolutions keep PyTorch's default initialisation, as the
reference does.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResidualDenseBlock", "ResidualInResidualDenseBlock", "RRDBEncoder"]

RESIDUAL_SCALE = 0.2


class ResidualDenseBlock(nn.Module):
    """Five densely connected conv3x3 layers: (B, nf, H, W) -> (B, nf, H, W), output ``0.2 * conv5 + x``.

    Layer k (k = 1..4) sees the input and all earlier outputs concatenated (nf + (k - 1) gc channels) and emits
    ``gc`` channels followed by LeakyReLU(0.2); the fifth maps nf + 4 gc channels back to nf, without activation.
    """

    def __init__(self, num_features: int = 64, growth_channels: int = 32) -> None:
        super().__init__()
        nf, gc = num_features, growth_channels
        self.convs = nn.ModuleList(nn.Conv2d(nf + k * gc, gc, 3, padding=1) for k in range(4))
        self.conv_out = nn.Conv2d(nf + 4 * gc, nf, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in self.convs:
            features.append(self.act(conv(torch.cat(features, dim=1))))
        return self.conv_out(torch.cat(features, dim=1)) * RESIDUAL_SCALE + x


class ResidualInResidualDenseBlock(nn.Module):
    """Three ``ResidualDenseBlock`` in a chain, output ``0.2 * chain(x) + x``; shape preserved."""

    def __init__(self, num_features: int = 64, growth_channels: int = 32) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualDenseBlock(num_features, growth_channels) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x) * RESIDUAL_SCALE + x


class RRDBEncoder(nn.Module):
    """SegDiff's image encoder G: (B, image_channels, H, W) normalised image -> (B, out_channels, H, W) features.

    Args:
        image_channels: channels of the input image (3 for RGB).
        out_channels: feature channels, equal to the U-Net width C so that G(I) can be added to F(x_t).
        num_blocks: number of RRDBs in the trunk (the reference's ``rrdb_blocks``: 12 for MoNuSeg, code default 3).
        num_features: trunk width nf (64 in the reference).
        growth_channels: dense-block growth gc (32 in the reference).
    """

    def __init__(
        self,
        image_channels: int = 3,
        out_channels: int = 128,
        num_blocks: int = 12,
        num_features: int = 64,
        growth_channels: int = 32,
    ) -> None:
        super().__init__()
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.image_channels = image_channels
        self.out_channels = out_channels
        self.conv_first = nn.Conv2d(image_channels, num_features, 3, padding=1)
        self.trunk = nn.Sequential(
            *(ResidualInResidualDenseBlock(num_features, growth_channels) for _ in range(num_blocks))
        )
        self.trunk_conv = nn.Conv2d(num_features, num_features, 3, padding=1)
        self.hr_conv = nn.Conv2d(num_features, num_features, 3, padding=1)
        self.conv_last = nn.Conv2d(num_features, out_channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 4 or image.shape[1] != self.image_channels:
            raise ValueError(f"image must be (B, {self.image_channels}, H, W), got shape {tuple(image.shape)}")
        features = self.conv_first(image)
        features = features + self.trunk_conv(self.trunk(features))
        return self.conv_last(self.act(self.hr_conv(features)))
