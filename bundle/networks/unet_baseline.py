"""The deterministic baseline: MONAI's 2-D ``UNet`` with the bundle's argument names.

Every network of the bundle takes ``image_channels`` and ``label_channels`` (and exposes them as attributes), so a
dataset overlay can set the image channels once (``network_def#image_channels``) whatever the method; this subclass
only renames MONAI's ``in_channels``/``out_channels``. The output is logits (B, label_channels, H, W); the
the ensemble inferer's ``DeterministicSampler`` turns them into probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.networks.nets import UNet

__all__ = ["BaselineUNet"]


class BaselineUNet(UNet):
    """MONAI ``UNet`` (2-D) for images (B, image_channels, H, W) -> logits (B, label_channels, H, W).

    Args:
        image_channels: input channels.
        label_channels: output channels (independent binary channels, sigmoid).
        channels: widths per level; H and W must be divisible by the product of ``strides``.
        strides: down-sampling factors between levels.
        num_res_units: residual units per block.
        norm: normalisation (MONAI name).
        dropout: dropout probability.
        spatial_dims: 2 (images, slices) or 3 (volume patches (B, C, H, W, D)).
    """

    def __init__(
        self,
        image_channels: int = 3,
        label_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 2,
        norm: str = "batch",
        dropout: float = 0.0,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=image_channels,
            out_channels=label_channels,
            channels=channels,
            strides=strides,
            num_res_units=num_res_units,
            norm=norm,
            dropout=dropout,
        )
        self.image_channels = image_channels
        self.label_channels = label_channels
        self.size_divisor = math.prod(int(s) for s in strides)  # what the input's sides must be a multiple of
