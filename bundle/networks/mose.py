"""MoSE (Gao et al. 2023): a U-Net, a gating network and K learnable Gaussian experts with a noise injector.

Architecture of gaozhitong/MoSE-AUSeg ``models/MoSE.py`` (METHODS.md section 4):

- U-Net: per level 3 x (conv3x3 + BatchNorm(eps 1e-3, momentum 0.01) + ReLU), average pooling between levels,
  bilinear up-sampling (align_corners=True), skip concatenation, a final 1x1 conv to ``num_channels[0]`` features.
- gating: global average of the deepest skip features (the level above the bottleneck) -> FC -> ReLU -> FC -> ReLU
  -> FC to K (no bias) -> softmax = pi(x), the expert weights.
- experts: image-independent N(mu_k, sigma_k^2) in ``latent_dim`` (1) dimensions, K = 4; mu initialised with the
  binary corners (rows [0], [1] for latent_dim 1) and the rest uniform in [0, 1); log sigma = log(1/8).
- noise injector: f' = (f + W_r z) * (W_s z + 1e-5) with linear W_r, W_s (Xavier, zero bias), then 1x1 conv layers
  (two C0 -> C0 conv + BN + ReLU, then C0 -> 2 classes + BN + ReLU, as the reference's ``Conv2DSequence``), softmax
  over {background, foreground} (one label channel, LIDC) or over the label channels (one-hot classes with
background, e.g. Hippocampus: an extension of the reference, which is binary).

Sample forms (``forward`` for training, ``sample_rows`` for the ensemble inferer): **weighted**, S = N / K latent draws per expert with weights pi_k / S (training and
MoSE's default evaluation), and **sampled**, expert k ~ Cat(pi) then z ~ N(mu_k, sigma_k^2) with uniform weights
(the README's ``eval_sample_num``). Weighted samples are ordered sample-major (index s * K + k), so the first
n * K samples are again a weighted set with n draws per expert.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bundle.networks.blocks import require_2d
from bundle.runtime import rand_rows, randn_rows

__all__ = ["MoSEUNet", "ExpertGating", "NoiseInjector", "MixtureOfStochasticExperts", "SAMPLE_MODES"]

SAMPLE_MODES = ("weighted", "sampled")


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, bias: bool = True) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=bias),
        nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01),
        nn.ReLU(inplace=True),
    ]


def _block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.AvgPool2d(2, 2, ceil_mode=True)] if pool else []
    for i in range(3):
        layers += _conv_bn_relu(c_in if i == 0 else c_out, c_out, 3)
    block = nn.Sequential(*layers)
    for m in block:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.normal_(m.bias, std=1e-3)
    return block


class MoSEUNet(nn.Module):
    """U-Net backbone: image (B, C_img, H, W) -> (global features (B, num_channels[-2]), dense (B, C0, H, W))."""

    def __init__(self, image_channels: int, num_channels: Sequence[int]) -> None:
        super().__init__()
        chans = [image_channels, *num_channels]
        levels = len(num_channels)
        self.down = nn.ModuleList(_block(chans[i], chans[i + 1], pool=i > 0) for i in range(levels))
        self.up = nn.ModuleList(
            _block(num_channels[i + 1] + num_channels[i], num_channels[i], pool=False)
            for i in reversed(range(levels - 1))
        )
        self.last = nn.Conv2d(num_channels[0], num_channels[0], 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        h = skips.pop()
        global_features = skips[-1].mean(dim=(2, 3))
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[2:], mode="bilinear", align_corners=True)
            h = block(torch.cat([h, skip], dim=1))
        return global_features, self.last(h)


class ExpertGating(nn.Sequential):
    """pi(x): (B, C) global features -> (B, K) expert weights (softmax)."""

    def __init__(self, channels: int, num_experts: int) -> None:
        super().__init__(
            nn.Linear(channels, channels),
            nn.ReLU(),
            nn.Linear(channels, channels),
            nn.ReLU(),
            nn.Linear(channels, num_experts, bias=False),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.softmax(super().forward(features).float(), dim=-1)


class NoiseInjector(nn.Module):
    """(features (B, C0, H, W), z (B, N, L)) -> class scores (B * N, num_classes, H, W), image-major."""

    def __init__(self, channels: int, latent_dim: int, num_classes: int = 2) -> None:
        super().__init__()
        self.residual = nn.Linear(latent_dim, channels)
        self.scale = nn.Linear(latent_dim, channels)
        for linear in (self.residual, self.scale):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        layers = _conv_bn_relu(channels, channels, 1, bias=False) + _conv_bn_relu(channels, channels, 1, bias=False)
        self.head = nn.Sequential(*layers, *_conv_bn_relu(channels, num_classes, 1, bias=True))
        for m in self.head:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        n = z.shape[1]
        f = features[:, None].expand(b, n, c, h, w).reshape(b * n, c, h, w)
        z = z.reshape(b * n, -1).to(features.dtype)
        f = (f + self.residual(z)[:, :, None, None]) * (self.scale(z)[:, :, None, None] + 1e-5)
        return self.head(f)


def _initial_means(num_experts: int, latent_dim: int) -> torch.Tensor:
    """Binary corners of the latent cube on the first 2**L rows, the rest uniform in [0, 1) (MoSE ``mu_init``)."""
    means = torch.rand(num_experts, latent_dim)
    corners = min(num_experts, 2**latent_dim)
    for row in range(corners):
        for i in range(latent_dim):
            means[row, i] = float((row >> (latent_dim - 1 - i)) & 1)
    return means


class MixtureOfStochasticExperts(nn.Module):
    """MoSE for binary segmentation; see the module docstring.

    Args:
        image_channels: input channels (1 for LIDC).
        label_channels: 1 (foreground = softmax over {background, foreground}) or the number of one-hot classes.
        num_channels: U-Net widths (reference LIDC: 32, 64, 128, 192, 192, 192, 192).
        num_experts: K (4).
        latent_dim: expert latent size (1).
        sample_chunk: most samples decoded per noise-injector call in ``sample_rows``.
        bn_momentum: momentum of every BatchNorm's running statistics (reference 0.01). The evaluation uses the
            running statistics, and at 0.01 they still hold about (0.99)^n of their initial values after n updates:
            a run of a few hundred iterations validates with statistics far from the trained network's (the CPU
            profile of configs/methods/mose.yaml uses 0.1).
    """

    def __init__(
        self,
        image_channels: int = 1,
        label_channels: int = 1,
        num_channels: Sequence[int] = (32, 64, 128, 192, 192, 192, 192),
        num_experts: int = 4,
        latent_dim: int = 1,
        sample_chunk: int = 16,
        spatial_dims: int = 2,
        bn_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        require_2d("MoSE", spatial_dims)
        if label_channels < 1:
            raise ValueError(f"label_channels must be >= 1, got {label_channels}")
        if len(num_channels) < 2:
            raise ValueError(f"need at least two levels, got num_channels={tuple(num_channels)}")
        self.image_channels, self.label_channels = image_channels, label_channels
        self.num_experts, self.latent_dim, self.sample_chunk = num_experts, latent_dim, sample_chunk
        self.num_levels = len(num_channels)
        self.size_divisor = 2 ** (self.num_levels - 1)  # what the input's sides must be a multiple of
        self.backbone = MoSEUNet(image_channels, num_channels)
        self.gating = ExpertGating(num_channels[-2], num_experts)
        self.num_classes = 2 if label_channels == 1 else label_channels
        self.injector = NoiseInjector(num_channels[0], latent_dim, self.num_classes)
        self.mu = nn.Parameter(_initial_means(num_experts, latent_dim))
        self.log_sigma = nn.Parameter(torch.full((num_experts, latent_dim), math.log(1 / 8)))
        if not 0.0 < bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1], got {bn_momentum}")
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = float(bn_momentum)

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert weights pi (B, K), dense features (B, C0, H, W)) for images (B, C_img, H, W)."""
        factor = 2 ** (self.num_levels - 1)
        if image.ndim != 4 or image.shape[1] != self.image_channels:
            raise ValueError(f"image must be (B, {self.image_channels}, H, W), got shape {tuple(image.shape)}")
        if image.shape[2] % factor or image.shape[3] % factor:
            raise ValueError(f"image height and width must be divisible by {factor}, got {tuple(image.shape[2:])}")
        global_features, dense = self.backbone(image)
        return self.gating(global_features), dense

    def latent_codes(
        self, expert_weights: torch.Tensor, num_generations: int, mode: str = "weighted"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z (B, N, L), sample weights (B, N)); reparameterised, so gradients reach mu and log sigma.

        ``weighted``: N must be a multiple of K; sample s * K + k is draw s of expert k with weight pi_k / S.
        ``sampled``: expert ids drawn from Cat(pi) per sample, uniform weights 1 / N.
        """
        b, k = expert_weights.shape
        device = expert_weights.device
        if mode == "weighted":
            if num_generations % k:
                raise ValueError(
                    f"weighted sampling needs num_generations divisible by num_experts={k}, got {num_generations}"
                )
            per_expert = num_generations // k
            experts = torch.arange(k, device=device).repeat(per_expert)[None].expand(b, -1)
            weights = expert_weights.gather(1, experts) / per_expert
        elif mode == "sampled":
            experts = torch.multinomial(expert_weights.detach().float(), num_generations, replacement=True)
            weights = torch.full((b, num_generations), 1.0 / num_generations, device=device)
        else:
            raise ValueError(f"mode must be one of {SAMPLE_MODES}, got {mode!r}")
        noise = torch.randn((b, num_generations, self.latent_dim), device=device)
        z = self.mu[experts] + (torch.exp(self.log_sigma[experts]) + 1e-8) * noise.to(self.mu.dtype)
        return z, weights

    def foreground_probability(self, dense: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, N, label_channels, H, W) class probabilities from dense features (B, C0, H, W) and z (B, N, L).

        One label channel: the foreground of a softmax over {background, foreground}; several: the softmax over the
        label channels themselves (one-hot classes, background included, as the Hippocampus labels).
        """
        scores = self.injector(dense, z)
        probs = torch.softmax(scores.float(), dim=1)
        probs = probs[:, 1:] if self.label_channels == 1 else probs
        return probs.reshape(z.shape[0], z.shape[1], self.label_channels, *dense.shape[2:])

    def forward(
        self, image: torch.Tensor, num_generations: int = 16, mode: str = "weighted"
    ) -> dict[str, torch.Tensor]:
        """Differentiable samples: ``{"probabilities": (B, N, label_channels, H, W), "weights": (B, N)}``."""
        expert_weights, dense = self.encode(image)
        z, weights = self.latent_codes(expert_weights, num_generations, mode)
        return {"probabilities": self.foreground_probability(dense, z), "weights": weights}

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a sample needs from the image, once per image: (expert weights pi (B, K), features (B, C0, H, W))."""
        return self.encode(image)

    def sample_rows(
        self,
        condition: tuple[torch.Tensor, torch.Tensor],
        generators: Sequence[torch.Generator],
        generation: torch.Tensor,
        num_generations: int,
        mode: str = "sampled",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation samples, one per row of ``condition`` (R rows of ``encode_image``'s output).

        ``sampled``: expert k_r ~ Cat(pi_r) by inverse CDF of a uniform from ``generators[r]``, weight 1 / N.
        ``weighted``: row r is draw s of expert k = generation_r mod K (N = num_generations must be a multiple of K),
        weight pi_k / S with S = N / K. Then z_r = mu_k + sigma_k eps_r (eps_r from ``generators[r]``).
        Returns (probabilities (R, label_channels, H, W) in [0, 1], weights (R,)).
        """
        expert_weights, dense = condition
        k = self.num_experts
        if mode == "weighted":
            if num_generations % k:
                raise ValueError(
                    f"weighted sampling needs num_generations divisible by num_experts={k}, got {num_generations}"
                )
            experts = (generation % k).to(expert_weights.device)
            weights = expert_weights.gather(1, experts[:, None])[:, 0] / (num_generations // k)
        elif mode == "sampled":
            uniform = rand_rows(generators, (1,), expert_weights.float())
            cumulative = expert_weights.float().cumsum(dim=1)
            experts = (uniform >= cumulative).sum(dim=1).clamp(max=k - 1)
            weights = torch.full((len(generators),), 1.0 / num_generations, device=dense.device)
        else:
            raise ValueError(f"mode must be one of {SAMPLE_MODES}, got {mode!r}")
        noise = randn_rows(generators, (self.latent_dim,), self.mu)
        z = self.mu[experts] + (torch.exp(self.log_sigma[experts]) + 1e-8) * noise
        parts = [
            self.foreground_probability(dense[i : i + self.sample_chunk], z[i : i + self.sample_chunk, None])[:, 0]
            for i in range(0, z.shape[0], self.sample_chunk)
        ]
        return torch.cat(parts), weights
