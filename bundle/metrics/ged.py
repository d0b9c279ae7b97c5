"""Generalized energy distance (GED) between a model's samples and the annotators' masks, with d = 1 - IoU.

GED^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')], expectations over the sample weights p_s (uniform unless given,
e.g. MoSE's expert weights) and the uniform annotator weights p_y, diagonals included:
GED = 2 sum p_s p_y d(s, y) - sum p_s p_s' d(s, s') - sum p_y p_y' d(y, y'). (The reported number is this value,
without a square root, as both reference implementations.)

Two conventions for a pair of empty masks (METHODS.md section 5):

- ``empty_pair="zero"`` (MoSE ``cal_metrics_batch``, default): d = 1 - (|a & b| + 1e-8) / (|a | b| + 1e-8), so two
  empty masks are at distance 0 and an empty one from a non-empty one at about 1;
- ``empty_pair="nan"`` (official Probabilistic U-Net code): 0 / 0 is NaN; only the annotator-annotator term is
  averaged NaN-aware, so an empty sample pair or an empty sample-annotation pair makes the image's GED NaN.

The dataset value is the NaN-aware mean over images.
"""

from __future__ import annotations

import math

import torch

from bundle.metrics.sample_sets import BinarySampleSetMetric, SampleSet, pairwise_iou_distance

__all__ = ["generalized_energy_distance", "GeneralizedEnergyDistance"]


def _expectation(distance: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor, nan_aware: bool) -> torch.Tensor:
    weight = w_a[:, None] * w_b[None, :]
    if not nan_aware:
        return (weight * distance).sum()
    valid = ~torch.isnan(distance)
    if not valid.any():
        return torch.tensor(math.nan, dtype=torch.float64)
    return (weight * distance.nan_to_num(0.0) * valid).sum() / (weight * valid).sum()


def generalized_energy_distance(
    samples: torch.Tensor,
    annotations: torch.Tensor,
    sample_weights: torch.Tensor | None = None,
    annotation_weights: torch.Tensor | None = None,
    empty_pair: str = "zero",
) -> float:
    """GED of one image from binary masks.

    Args:
        samples: (N, C, *spatial) binary sample masks (bool or {0, 1}).
        annotations: (M, C, *spatial) binary annotator masks.
        sample_weights: (N,) weights summing to 1; None means uniform.
        annotation_weights: (M,) weights summing to 1; None means uniform.
        empty_pair: "zero" (MoSE) or "nan" (official Probabilistic U-Net); see the module docstring.

    Returns:
        GED as a float (NaN possible under ``empty_pair="nan"``).
    """
    s = torch.as_tensor(samples).bool().flatten(2)
    y = torch.as_tensor(annotations).bool().flatten(2)
    n, m = s.shape[0], y.shape[0]
    w_s = (
        torch.full((n,), 1.0 / n, dtype=torch.float64)
        if sample_weights is None
        else torch.as_tensor(sample_weights, dtype=torch.float64)
    )
    w_y = (
        torch.full((m,), 1.0 / m, dtype=torch.float64)
        if annotation_weights is None
        else torch.as_tensor(annotation_weights, dtype=torch.float64)
    )
    return float(_ged(s, y, w_s, w_y, empty_pair))


def _ged(s: torch.Tensor, y: torch.Tensor, w_s: torch.Tensor, w_y: torch.Tensor, empty_pair: str) -> torch.Tensor:
    d_sy = pairwise_iou_distance(s, y, empty_pair)
    d_ss = pairwise_iou_distance(s, s, empty_pair)
    d_yy = pairwise_iou_distance(y, y, empty_pair)
    w_s, w_y = w_s.to(d_sy.device), w_y.to(d_sy.device)
    return (
        2 * _expectation(d_sy, w_s, w_y, nan_aware=False)
        - _expectation(d_ss, w_s, w_s, nan_aware=False)
        - _expectation(d_yy, w_y, w_y, nan_aware=(empty_pair == "nan"))
    )


class GeneralizedEnergyDistance(BinarySampleSetMetric):
    """GED per image (samples binarised at ``threshold``), NaN-aware mean over images by ``aggregate()``.

    Args:
        num_generations: use the first ``num_generations`` samples of each image (GED(16) from a 100-sample run); None: all.
        empty_pair: "zero" (MoSE, default) or "nan" (official Probabilistic U-Net).
        threshold: sample probabilities > threshold are foreground.
        label_channels, label_threshold: see :class:`~bundle.metrics.sample_sets.SampleSetMetric`.
    """

    def score(self, sample_set: SampleSet) -> torch.Tensor:
        value = _ged(
            sample_set.binary_samples(self.threshold),
            sample_set.annotations,
            sample_set.weights,
            sample_set.annotation_weights,
            self.empty_pair,
        )
        return value.float().reshape(1, 1).cpu()

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            return torch.tensor(math.nan)
        return torch.nanmean(data.float())
