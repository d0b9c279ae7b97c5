"""Calibration score of an ensemble's per-pixel foreground probability (10 uniform bins), per image.

What is binned: the ensemble mean foreground probability p of every pixel of an image (the inferer's ``mean``
output, i.e. the average over the N generations of clamp((x + 1) / 2, 0, 1); for binary samples it is the fraction
of generations that vote foreground). The pixels are put into ``num_bins`` equal-width bins of p, bin k holding
k / K <= p < (k + 1) / K (the last bin also holds p = 1, so every pixel is in exactly one bin). For each non-empty
bin, conf_k is the mean p of its pixels and freq_k the fraction of its pixels that are foreground in the label.

    calibration = sum_k (n_k / n) |conf_k - freq_k|        (0 = perfectly calibrated, at most 1)

This is the expected calibration error of the foreground probability of one image; the dataset score is the mean
over images (the SegDiff paper reports a calibration score computed with 10 uniform bins; this module's docstring
is the definition the bundle uses). Differences from ``ECE`` in the MoSE code (METHODS.md section 5): pixels with
p = 0 fall in the first bin instead of no bin, and the score is per image rather than pooled over the dataset.
"""

from __future__ import annotations

import math

import torch
from monai.metrics import CumulativeIterationMetric

__all__ = ["calibration_bins", "calibration_error", "CalibrationScoreMetric"]


def calibration_bins(
    prob: torch.Tensor, label: torch.Tensor, num_bins: int = 10, label_threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image and channel: pixel count, sum of p and count of foreground labels in each bin, each (B, C, K).

    Args:
        prob: (B, C, *spatial) foreground probabilities in [0, 1].
        label: same shape; foreground where ``label > label_threshold``.
        num_bins: K equal-width bins over [0, 1].
    """
    if prob.shape != label.shape:
        raise ValueError(f"probability shape {tuple(prob.shape)} differs from label shape {tuple(label.shape)}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if prob.ndim < 3:
        raise ValueError(f"expected (B, C, *spatial) probabilities, got shape {tuple(prob.shape)}")
    p = prob.detach().flatten(2).double()
    if p.numel() and (p.min() < -1e-6 or p.max() > 1 + 1e-6 or torch.isnan(p).any()):
        raise ValueError(f"probabilities must lie in [0, 1], got values in [{p.min():.4g}, {p.max():.4g}]")
    p = p.clamp(0.0, 1.0)
    y = (label.detach().flatten(2) > label_threshold).double()
    index = (p * num_bins).floor().long().clamp(max=num_bins - 1)
    shape = (*p.shape[:2], num_bins)
    counts = torch.zeros(shape, dtype=torch.float64, device=p.device).scatter_add_(2, index, torch.ones_like(p))
    conf_sum = torch.zeros(shape, dtype=torch.float64, device=p.device).scatter_add_(2, index, p)
    label_sum = torch.zeros(shape, dtype=torch.float64, device=p.device).scatter_add_(2, index, y)
    return counts, conf_sum, label_sum


def calibration_error(
    prob: torch.Tensor, label: torch.Tensor, num_bins: int = 10, label_threshold: float = 0.0
) -> torch.Tensor:
    """The calibration score sum_k (n_k / n) |conf_k - freq_k| per image and channel, (B, C), in [0, 1]."""
    counts, conf_sum, label_sum = calibration_bins(prob, label, num_bins, label_threshold)
    total = counts.sum(-1).clamp(min=1)
    gap = (conf_sum - label_sum).abs()  # = n_k |conf_k - freq_k|
    return gap.sum(-1) / total


class CalibrationScoreMetric(CumulativeIterationMetric):
    """Per-image calibration score (see the module docstring), averaged over images and channels.

    ``__call__(y_pred, y)`` takes the ensemble mean probabilities (B, C, H, W) in [0, 1] and labels of the same
    shape; lower is better.

    Args:
        num_bins: number of equal-width probability bins (10).
        label_threshold: foreground where the label is above it (0 for labels in {-1, 1} or {0, 1}).
    """

    def __init__(self, num_bins: int = 10, label_threshold: float = 0.0) -> None:
        super().__init__()
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        self.label_threshold = label_threshold

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("CalibrationScoreMetric needs labels")
        return calibration_error(
            torch.as_tensor(y_pred), torch.as_tensor(y), self.num_bins, self.label_threshold
        ).float()

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            return torch.tensor(math.nan)
        return torch.nanmean(data.float())
