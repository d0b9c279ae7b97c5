"""Hungarian-matched IoU (HM-IoU, MoSE's "M-IoU"): IoU of the samples matched one-to-one to the annotations.

With the N x M distance matrix d = 1 - IoU (``bundle.metrics.sample_sets.pairwise_iou_distance``):

- uniform weights (the usual case): the samples and annotations are repeated to L = lcm(N, M) items each, the L x L
  assignment problem is solved with ``scipy.optimize.linear_sum_assignment`` and HM-IoU is the mean of 1 - d over the
  matched pairs. For N % M == 0 this is exactly MoSE's tiling of the annotations N / M times; for other N, M it
  equals the optimal transport between the two uniform distributions (what MoSE gets from ``ot.emd``), because a
  transport plan between two uniform L-point measures has a permutation optimum.
- weighted samples (MoSE's weighted evaluation): the optimal transport plan P between the sample weights and the
  uniform annotator weights with cost d (a small linear programme, ``scipy.optimize.linprog``); HM-IoU = sum P (1-d).

A NaN distance (``empty_pair="nan"``) makes the image's HM-IoU NaN. The dataset value is the NaN-aware mean over
images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment, linprog

from bundle.metrics.sample_sets import BinarySampleSetMetric, SampleSet, pairwise_iou_distance

__all__ = ["matched_iou_from_distance", "hungarian_matched_iou", "HungarianMatchedIoU"]

_MAX_TILED = 2000  # above this lcm(N, M) the transport LP is used even for uniform weights


def _is_uniform(w: np.ndarray) -> bool:
    return bool(np.allclose(w, w.mean(), rtol=0.0, atol=1e-12))


def _transport_plan(cost: np.ndarray, w_s: np.ndarray, w_y: np.ndarray) -> np.ndarray:
    """Optimal transport plan (N, M) between w_s and w_y for ``cost`` (exact LP, HiGHS)."""
    n, m = cost.shape
    rows = np.kron(np.eye(n), np.ones((1, m)))
    cols = np.kron(np.ones((1, n)), np.eye(m))
    result = linprog(
        cost.ravel(), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([w_s, w_y]), bounds=(0, None), method="highs"
    )
    if not result.success:
        raise RuntimeError(f"optimal transport LP failed: {result.message}")
    return result.x.reshape(n, m)


def matched_iou_from_distance(
    distance: np.ndarray | torch.Tensor,
    sample_weights: np.ndarray | None = None,
    annotation_weights: np.ndarray | None = None,
) -> float:
    """HM-IoU from an (N, M) distance matrix d = 1 - IoU and optional weights (see the module docstring)."""
    d = np.asarray(torch.as_tensor(distance, dtype=torch.float64).cpu().numpy())
    n, m = d.shape
    if np.isnan(d).any():
        return math.nan
    w_s = np.full(n, 1.0 / n) if sample_weights is None else np.asarray(sample_weights, dtype=np.float64)
    w_y = np.full(m, 1.0 / m) if annotation_weights is None else np.asarray(annotation_weights, dtype=np.float64)
    w_s, w_y = w_s / w_s.sum(), w_y / w_y.sum()
    size = math.lcm(n, m)
    if _is_uniform(w_s) and _is_uniform(w_y) and size <= _MAX_TILED:
        tiled = np.repeat(np.repeat(d, size // n, axis=0), size // m, axis=1)
        rows, cols = linear_sum_assignment(tiled)
        return float((1.0 - tiled[rows, cols]).mean())
    plan = _transport_plan(d, w_s, w_y)
    return float((plan * (1.0 - d)).sum())


def hungarian_matched_iou(
    samples: torch.Tensor,
    annotations: torch.Tensor,
    sample_weights: torch.Tensor | None = None,
    empty_pair: str = "zero",
) -> float:
    """HM-IoU of one image from binary masks samples (N, C, *spatial) and annotations (M, C, *spatial)."""
    s = torch.as_tensor(samples).bool().flatten(2)
    y = torch.as_tensor(annotations).bool().flatten(2)
    weights = None if sample_weights is None else torch.as_tensor(sample_weights, dtype=torch.float64).numpy()
    return matched_iou_from_distance(pairwise_iou_distance(s, y, empty_pair), weights)


class HungarianMatchedIoU(BinarySampleSetMetric):
    """HM-IoU per image (samples binarised at ``threshold``), NaN-aware mean over images by ``aggregate()``.

    Args:
        num_generations: use the first ``num_generations`` samples of each image (HM-IoU(16)); None: all.
        empty_pair: "zero" (MoSE, default) or "nan".
        threshold: sample probabilities > threshold are foreground.
        label_channels, label_threshold: see :class:`~bundle.metrics.sample_sets.SampleSetMetric`.
    """

    def score(self, sample_set: SampleSet) -> torch.Tensor:
        distance = pairwise_iou_distance(
            sample_set.binary_samples(self.threshold), sample_set.annotations, self.empty_pair
        )
        value = matched_iou_from_distance(
            distance, sample_set.weights.cpu().numpy(), sample_set.annotation_weights.cpu().numpy()
        )
        return torch.tensor([[value]], dtype=torch.float32)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            return torch.tensor(math.nan)
        return torch.nanmean(data.float())
