"""Probabilistic U-Net (Kohl et al. 2018): a U-Net whose output is modulated by a latent z from a learned prior.

Architecture of the official code (METHODS.md section 3):

- U-Net of VGG blocks: 3 x (conv3x3 + ReLU) per level, average pooling between levels, bilinear up-sampling
  (align_corners=True), skip concatenation; the last decoder features have ``num_channels[0]`` channels.
- prior net p(z | x) and posterior net q(z | x, y): the same encoder on the image (posterior: image concatenated
  with the mask minus 0.5), spatial mean of the deepest features, 1x1 conv to (mu, log sigma) of an axis-aligned
  Gaussian of ``latent_dim`` (6) dimensions.
- f_comb: z tiled over the image and concatenated with the last U-Net features, ``num_fcomb_layers`` x (1x1 conv +
  ReLU), then a 1x1 conv to ``label_channels`` logits; orthogonal weight initialisation.

Training feeds a posterior sample to f_comb and adds beta * KL(q || p) (``bundle.engines.steps.prob_unet``);
inference draws z from the prior (``encode_image`` once per image, ``sample_rows`` per generation, driven by the
ensemble inferer's ``LatentSampler``). Outputs are logits of independent binary channels (sigmoid), the binary form of the paper's
softmax cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

from bundle.networks.blocks import require_2d
from bundle.runtime import randn_rows

__all__ = ["VGGEncoder", "AxisAlignedGaussianNet", "ProbabilisticUNet"]


def _vgg_block(c_in: int, c_out: int, convs: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.AvgPool2d(2, 2, ceil_mode=True)] if pool else []
    for i in range(convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class VGGEncoder(nn.Module):
    """Levels of ``convs_per_block`` x (conv3x3 + ReLU), average-pooled by 2 between levels.

    Input (B, in_channels, H, W) -> list of level features, level i (B, num_channels[i], H / 2**i, W / 2**i).
    """

    def __init__(self, in_channels: int, num_channels: Sequence[int], convs_per_block: int = 3) -> None:
        super().__init__()
        chans = [in_channels, *num_channels]
        self.blocks = nn.ModuleList(
            _vgg_block(chans[i], chans[i + 1], convs_per_block, pool=i > 0) for i in range(len(num_channels))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features


class AxisAlignedGaussianNet(nn.Module):
    """Prior or posterior net: encoder -> spatial mean -> 1x1 conv -> (mu, log sigma) of N(mu, diag(sigma^2))."""

    def __init__(self, in_channels: int, num_channels: Sequence[int], latent_dim: int, convs_per_block: int = 3):
        super().__init__()
        self.encoder = VGGEncoder(in_channels, num_channels, convs_per_block)
        self.head = nn.Conv2d(num_channels[-1], 2 * latent_dim, 1)
        self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor) -> Independent:
        """Distribution over z with batch shape (B,) and event shape (latent_dim,).

        Its arguments are not validated: a diverged network's NaN reaches the loss, where the trainer stops the
        run naming the iteration, instead of failing inside ``torch.distributions`` with a shape message.
        """
        pooled = self.encoder(x)[-1].mean(dim=(2, 3), keepdim=True)
        mu, log_sigma = self.head(pooled).flatten(1).chunk(2, dim=1)
        return Independent(Normal(mu, torch.exp(log_sigma), validate_args=False), 1, validate_args=False)


class ProbabilisticUNet(nn.Module):
    """Probabilistic U-Net; see the module docstring.

    Args:
        image_channels: channels of the input image (1 for LIDC CT crops, 3 for RGB).
        label_channels: binary output channels (1 for a foreground mask).
        num_channels: widths per level (paper/Knegt LIDC: 32, 64, 128, 192).
        latent_dim: size of z (6 in the paper).
        num_fcomb_layers: 1x1 conv + ReLU layers of f_comb before its output conv (3 in the paper).
        convs_per_block: conv layers per VGG block (3).
        posterior_shift: subtracted from the mask before it enters the posterior net (0.5, official code).
        sample_chunk: most samples decoded per f_comb call in ``sample_rows`` (memory bound).
    """

    def __init__(
        self,
        image_channels: int = 1,
        label_channels: int = 1,
        num_channels: Sequence[int] = (32, 64, 128, 192),
        latent_dim: int = 6,
        num_fcomb_layers: int = 3,
        convs_per_block: int = 3,
        posterior_shift: float = 0.5,
        sample_chunk: int = 16,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        require_2d("The Probabilistic U-Net", spatial_dims)
        if len(num_channels) < 2:
            raise ValueError(f"need at least two levels, got num_channels={tuple(num_channels)}")
        self.image_channels, self.label_channels, self.latent_dim = image_channels, label_channels, latent_dim
        self.posterior_shift, self.sample_chunk = posterior_shift, sample_chunk
        self.num_levels = len(num_channels)
        self.size_divisor = 2 ** (self.num_levels - 1)  # what the input's sides must be a multiple of
        self.encoder = VGGEncoder(image_channels, num_channels, convs_per_block)
        self.decoder = nn.ModuleList(
            _vgg_block(num_channels[i + 1] + num_channels[i], num_channels[i], convs_per_block, pool=False)
            for i in reversed(range(self.num_levels - 1))
        )
        self.prior_net = AxisAlignedGaussianNet(image_channels, num_channels, latent_dim, convs_per_block)
        self.posterior_net = AxisAlignedGaussianNet(
            image_channels + label_channels, num_channels, latent_dim, convs_per_block
        )
        width = num_channels[0]
        layers: list[nn.Module] = []
        for i in range(num_fcomb_layers):
            layers += [nn.Conv2d(width + latent_dim if i == 0 else width, width, 1), nn.ReLU(inplace=True)]
        self.fcomb = nn.Sequential(*layers)
        self.fcomb_out = nn.Conv2d(width if num_fcomb_layers else width + latent_dim, label_channels, 1)
        for module in [*self.fcomb, self.fcomb_out]:
            if isinstance(module, nn.Conv2d):
                nn.init.orthogonal_(module.weight)
                nn.init.normal_(module.bias, std=1e-3)

    def _check_image(self, image: torch.Tensor) -> None:
        factor = 2 ** (self.num_levels - 1)
        if image.ndim != 4 or image.shape[1] != self.image_channels:
            raise ValueError(f"image must be (B, {self.image_channels}, H, W), got shape {tuple(image.shape)}")
        if image.shape[2] % factor or image.shape[3] % factor:
            raise ValueError(f"image height and width must be divisible by {factor}, got {tuple(image.shape[2:])}")

    def unet_features(self, image: torch.Tensor) -> torch.Tensor:
        """Last U-Net decoder features (B, num_channels[0], H, W)."""
        self._check_image(image)
        skips = self.encoder(image)
        h = skips[-1]
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            h = F.interpolate(h, size=skip.shape[2:], mode="bilinear", align_corners=True)
            h = block(torch.cat([h, skip], dim=1))
        return h

    def prior(self, image: torch.Tensor) -> Independent:
        """p(z | image), batch shape (B,), event shape (latent_dim,)."""
        return self.prior_net(image)

    def posterior(self, image: torch.Tensor, segmentation: torch.Tensor) -> Independent:
        """q(z | image, segmentation); ``segmentation`` (B, label_channels, H, W) in {0, 1}."""
        if segmentation.shape != (image.shape[0], self.label_channels, *image.shape[2:]):
            raise ValueError(
                f"segmentation must be (B, {self.label_channels}, H, W) like the image {tuple(image.shape)}, got "
                f"{tuple(segmentation.shape)}"
            )
        return self.posterior_net(torch.cat([image, segmentation.to(image.dtype) - self.posterior_shift], dim=1))

    def combine(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """f_comb: logits (R, label_channels, H, W) from features (R, C0, H, W) and z (R, latent_dim)."""
        tiled = z[:, :, None, None].expand(-1, -1, *features.shape[2:])
        return self.fcomb_out(self.fcomb(torch.cat([features, tiled], dim=1)))

    def kl(self, image: torch.Tensor, segmentation: torch.Tensor) -> torch.Tensor:
        """Analytic KL(q(z | x, y) || p(z | x)) per image, (B,)."""
        return kl_divergence(self.posterior(image, segmentation), self.prior(image))

    def elbo_terms(self, image: torch.Tensor, segmentation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: (logits (B, C, H, W) decoded from a posterior sample, KL(q || p) (B,))."""
        posterior, prior = self.posterior(image, segmentation), self.prior(image)
        logits = self.combine(self.unet_features(image), posterior.rsample())
        return logits, kl_divergence(posterior, prior)

    def forward(
        self, image: torch.Tensor, segmentation: torch.Tensor | None = None, return_kl: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, C, H, W) for one z per image: from the posterior when ``segmentation`` is given, else the prior.

        ``return_kl=True`` (needs ``segmentation``) is the training pass: (logits, KL(q || p) per image (B,)).
        """
        if return_kl:
            if segmentation is None:
                raise ValueError("return_kl=True needs the segmentation for the posterior")
            return self.elbo_terms(image, segmentation)
        dist = self.prior(image) if segmentation is None else self.posterior(image, segmentation)
        return self.combine(self.unet_features(image), dist.rsample())

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What a sample needs from the image, once per image: (U-Net features (B, C0, H, W), prior mean and
        standard deviation (B, latent_dim) each)."""
        prior = self.prior(image)
        return self.unet_features(image), prior.base_dist.loc, prior.base_dist.scale

    def sample_rows(
        self,
        condition: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        generators: Sequence[torch.Generator],
        generation: torch.Tensor | None = None,
        num_generations: int | None = None,
    ) -> tuple[torch.Tensor, None]:
        """Prior samples: z_r = mu_r + sigma_r eps_r with eps_r from ``generators[r]``, decoded by f_comb.

        ``condition`` holds R rows of ``encode_image``'s output (one per generation); returns (probabilities
        (R, label_channels, H, W) in [0, 1], None). Only f_comb runs per sample, in chunks of ``sample_chunk``.
        """
        features, loc, scale = condition
        z = loc + scale * randn_rows(generators, (self.latent_dim,), loc)
        parts = [
            torch.sigmoid(self.combine(features[i : i + self.sample_chunk], z[i : i + self.sample_chunk]))
            for i in range(0, z.shape[0], self.sample_chunk)
        ]
        return torch.cat(parts), None
