"""SegDiff's extra per-image metrics: weighted coverage (WCov) and the boundary F-score.

Both score the binarised ensemble mean (``p > threshold``, as ``bundle.metrics.binary``) against the label
(``y > label_threshold``), per image and channel; the dataset score is the mean over images. Definitions follow the
SegDiff reference (``improved_diffusion/metrics.py``, itself the DAVIS benchmark's ``db_eval_boundary``):

- **WCov** = min(|P|, |G|) / max(|P|, |G|), the ratio of the predicted and true foreground areas. The reference
  divides by zero when both masks are empty; here that case scores ``empty_score`` (1.0: the areas agree).
- **Boundary F** at tolerance d pixels: the one-pixel boundary map of each mask (``boundary_map``, the DAVIS
  ``seg2bmap``: a pixel is on the boundary when it differs from its right, lower or lower-right neighbour, so the
  map lies half a pixel towards the origin), precision = fraction of predicted boundary pixels within Euclidean
  distance d of a true boundary pixel (dilation by a disk of radius d), recall the converse, F = 2PR / (P + R).
  No predicted boundary gives P = 1, R = 0 (and the converse); both empty gives P = R = 1. ``BoundaryFScoreMetric``
  reports the mean F over the tolerances 1..5 px (the reference's ``FBound``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from scipy.ndimage import binary_dilation

__all__ = [
    "binarise",
    "weighted_coverage",
    "boundary_map",
    "disk",
    "boundary_precision_recall",
    "boundary_f_score",
    "WeightedCoverageMetric",
    "BoundaryFScoreMetric",
]

DEFAULT_TOLERANCES = (1, 2, 3, 4, 5)


def binarise(
    pred: torch.Tensor, label: torch.Tensor, threshold: float = 0.5, label_threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (B, C, H, W) from probabilities and labels of the same shape (B, C, H, W)."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    if pred.ndim != 4:
        raise ValueError(f"expected 2D masks of shape (B, C, H, W), got shape {tuple(pred.shape)}")
    return pred > threshold, label > label_threshold


def weighted_coverage(pred_mask: torch.Tensor, true_mask: torch.Tensor, empty_score: float = 1.0) -> torch.Tensor:
    """WCov per image and channel, (B, C), from boolean masks (B, C, *spatial)."""
    p = pred_mask.flatten(2).sum(-1).double()
    g = true_mask.flatten(2).sum(-1).double()
    high = torch.maximum(p, g)
    score = torch.minimum(p, g) / high.clamp(min=1)
    return torch.where(high > 0, score, torch.full_like(score, empty_score))


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary (H, W) bool of a binary mask (H, W), as the DAVIS/SegDiff ``seg2bmap``."""
    seg = np.asarray(mask, dtype=bool)
    if seg.ndim != 2:
        raise ValueError(f"boundary_map expects a 2D mask, got shape {seg.shape}")
    right = np.zeros_like(seg)
    below = np.zeros_like(seg)
    below_right = np.zeros_like(seg)
    right[:, :-1] = seg[:, 1:]
    below[:-1, :] = seg[1:, :]
    below_right[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ right) | (seg ^ below) | (seg ^ below_right)
    bmap[-1, :] = seg[-1, :] ^ right[-1, :]
    bmap[:, -1] = seg[:, -1] ^ below[:, -1]
    bmap[-1, -1] = False
    return bmap


def disk(radius: int) -> np.ndarray:
    """Disk footprint (2r + 1, 2r + 1) bool: offsets (dy, dx) with dy^2 + dx^2 <= r^2."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def boundary_precision_recall(pred_mask: np.ndarray, true_mask: np.ndarray, tolerance: int) -> tuple[float, float]:
    """Boundary precision and recall of two (H, W) binary masks at ``tolerance`` pixels."""
    if np.shape(pred_mask) != np.shape(true_mask):
        raise ValueError(f"mask shapes differ: {np.shape(pred_mask)} and {np.shape(true_mask)}")
    pred_boundary, true_boundary = boundary_map(pred_mask), boundary_map(true_mask)
    n_pred, n_true = int(pred_boundary.sum()), int(true_boundary.sum())
    if n_pred == 0 or n_true == 0:
        return (1.0 if n_pred == 0 else 0.0), (1.0 if n_true == 0 else 0.0)
    footprint = disk(tolerance)
    pred_near_true = pred_boundary & binary_dilation(true_boundary, structure=footprint)
    true_near_pred = true_boundary & binary_dilation(pred_boundary, structure=footprint)
    return float(pred_near_true.sum()) / n_pred, float(true_near_pred.sum()) / n_true


def boundary_f_score(
    pred_mask: np.ndarray, true_mask: np.ndarray, tolerances: Sequence[int] = DEFAULT_TOLERANCES
) -> float:
    """Mean over ``tolerances`` of the boundary F-score of two (H, W) binary masks, in [0, 1]."""
    scores = []
    for tolerance in tolerances:
        precision, recall = boundary_precision_recall(pred_mask, true_mask, int(tolerance))
        total = precision + recall
        scores.append(0.0 if total == 0 else 2 * precision * recall / total)
    return float(np.mean(scores))


class _PerImageMaskMetric(CumulativeIterationMetric):
    """Per-image scores (B, C) of binarised predictions, averaged over images and channels (NaN-aware)."""

    def __init__(self, threshold: float = 0.5, label_threshold: float = 0.0) -> None:
        super().__init__()
        self.threshold = threshold
        self.label_threshold = label_threshold

    def _score(self, pred_mask: torch.Tensor, true_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError(f"{type(self).__name__} needs labels")
        pred_mask, true_mask = binarise(
            torch.as_tensor(y_pred), torch.as_tensor(y), self.threshold, self.label_threshold
        )
        return self._score(pred_mask, true_mask).float()

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            return torch.tensor(math.nan)
        return torch.nanmean(data.float())


class WeightedCoverageMetric(_PerImageMaskMetric):
    """WCov per image: ``__call__(y_pred, y)`` with probabilities and labels (B, C, H, W); buffer rows (C,).

    Args:
        threshold: foreground where the probability is above it (0.5; exactly 0.5 is background).
        label_threshold: foreground where the label is above it (0 for labels in {-1, 1} or {0, 1}).
        empty_score: score when both masks are empty.
    """

    def __init__(self, threshold: float = 0.5, label_threshold: float = 0.0, empty_score: float = 1.0) -> None:
        super().__init__(threshold, label_threshold)
        self.empty_score = empty_score

    def _score(self, pred_mask: torch.Tensor, true_mask: torch.Tensor) -> torch.Tensor:
        return weighted_coverage(pred_mask, true_mask, self.empty_score)


class BoundaryFScoreMetric(_PerImageMaskMetric):
    """Boundary F-score per image, mean over ``tolerances`` (1..5 px); same call convention as WCov.

    Args:
        threshold / label_threshold: as ``WeightedCoverageMetric``.
        tolerances: boundary tolerances in pixels whose F-scores are averaged.
    """

    def __init__(
        self, threshold: float = 0.5, label_threshold: float = 0.0, tolerances: Sequence[int] = DEFAULT_TOLERANCES
    ) -> None:
        super().__init__(threshold, label_threshold)
        if not tolerances or any(int(t) < 0 for t in tolerances):
            raise ValueError(f"tolerances must be non-negative pixel counts, got {tolerances}")
        self.tolerances = tuple(int(t) for t in tolerances)

    def _score(self, pred_mask: torch.Tensor, true_mask: torch.Tensor) -> torch.Tensor:
        pred_np, true_np = pred_mask.cpu().numpy(), true_mask.cpu().numpy()
        batch, channels = pred_np.shape[:2]
        scores = [
            [boundary_f_score(pred_np[b, c], true_np[b, c], self.tolerances) for c in range(channels)]
            for b in range(batch)
        ]
        return torch.tensor(scores, dtype=torch.float64)
