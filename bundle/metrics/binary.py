"""Per-image binary segmentation metrics at the ensemble threshold (the cDAL/SegDiff protocol).

Each image is scored on its own: the mean foreground probability is binarised with ``p > threshold`` (0.5, so
exactly 0.5 is background, as ``round()`` in the reference), the label with ``y > label_threshold`` (labels may be
{0, 1} or {-1, 1}), and Dice (F1), IoU (Jaccard), precision and recall are computed from the pixel counts of that
image. The dataset score is the mean over images (and over foreground channels).

Empty cases: a ratio whose denominator is zero (e.g. Dice when both masks are empty, precision with no predicted
foreground) scores ``empty_score``. The default 0.0 is what the reference gets from scikit-learn's ``f1_score`` /
``jaccard_score`` / ``precision_score`` / ``recall_score`` with their default ``zero_division``; set 1.0 to count a
correctly empty prediction as perfect, or NaN to leave such images out of the mean.
"""

from __future__ import annotations

import math

import torch
from monai.metrics import CumulativeIterationMetric

BINARY_METRICS = ("dice", "iou", "precision", "recall")


def confusion_counts(
    pred: torch.Tensor, label: torch.Tensor, threshold: float = 0.5, label_threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tp, fp, fn) per image and channel, each (B, C), from probabilities and labels of shape (B, C, *spatial)."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    p = (pred > threshold).flatten(2)
    y = (label > label_threshold).flatten(2)
    tp = (p & y).sum(-1).double()
    fp = (p & ~y).sum(-1).double()
    fn = (~p & y).sum(-1).double()
    return tp, fp, fn


def binary_scores(
    tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, metric: str, empty_score: float = 0.0
) -> torch.Tensor:
    """One metric from pixel counts (any shape); zero denominators give ``empty_score``."""
    if metric == "dice":
        num, den = 2 * tp, 2 * tp + fp + fn
    elif metric == "iou":
        num, den = tp, tp + fp + fn
    elif metric == "precision":
        num, den = tp, tp + fp
    elif metric == "recall":
        num, den = tp, tp + fn
    else:
        raise ValueError(f"unknown metric {metric!r}; choose one of {BINARY_METRICS}")
    score = num / den.clamp(min=1)
    return torch.where(den > 0, score, torch.full_like(score, empty_score))


class PerImageBinaryMetric(CumulativeIterationMetric):
    """One of Dice / IoU / precision / recall, per image, averaged over images.

    ``__call__(y_pred, y)`` takes probabilities (B, C, H, W) in [0, 1] and labels of the same shape; the buffer
    holds one row of C scores per image; ``aggregate()`` returns the mean over images and channels (NaN-aware).
    """

    def __init__(
        self, metric: str = "dice", threshold: float = 0.5, label_threshold: float = 0.0, empty_score: float = 0.0
    ) -> None:
        super().__init__()
        if metric not in BINARY_METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {BINARY_METRICS}")
        self.metric = metric
        self.threshold = threshold
        self.label_threshold = label_threshold
        self.empty_score = empty_score

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("PerImageBinaryMetric needs labels")
        tp, fp, fn = confusion_counts(y_pred, y, self.threshold, self.label_threshold)
        return binary_scores(tp, fp, fn, self.metric, self.empty_score).float()

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            return torch.tensor(math.nan)
        return torch.nanmean(data.float())
