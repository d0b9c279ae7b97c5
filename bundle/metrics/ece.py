"""Expected calibration error over all test pixels pooled (MoSE ``calculate_ece``).

Per pixel: the confidence is the model's marginal foreground probability conf = sum_n p_n * prob_n (p_n the sample
weights, uniform unless given) and the target is the annotators' foreground frequency label = sum_m p_m [y_m = fg].
All pixels of all images are pooled (the dataset value is not a mean over images). With ``num_bins`` = 10 bins
(lo, hi] = (0, 0.1], ..., (0.9, 1.0], a pixel with conf = 0 falls in no bin but still counts in the denominator:
ECE = sum_bins |mean conf - mean label| * n_bin / n_all. Values are fractions (MoSE prints them as percent).
With several label channels, the pixels of all channels are pooled.
"""

from __future__ import annotations

import math

import torch

from bundle.metrics.sample_sets import SampleSet, SampleSetMetric

__all__ = [
    "calibration_bin_statistics",
    "ece_from_statistics",
    "expected_calibration_error",
    "ExpectedCalibrationError",
]


def _edges(num_bins: int) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)


def calibration_bin_statistics(confidence: torch.Tensor, label: torch.Tensor, num_bins: int = 10) -> torch.Tensor:
    """Additive per-bin statistics (1, 3 * num_bins + 1) float64: counts, sums of conf, sums of label, n_all.

    Args:
        confidence: any shape, values in [0, 1].
        label: same shape, target frequencies in [0, 1].
        num_bins: number of equal-width bins (lo, hi].
    """
    conf = torch.as_tensor(confidence).detach().double().flatten().cpu()
    lab = torch.as_tensor(label).detach().double().flatten().cpu()
    if conf.shape != lab.shape:
        raise ValueError(f"confidence has {conf.numel()} values but label has {lab.numel()}")
    if conf.numel() and (conf.min() < 0 or conf.max() > 1):
        raise ValueError(f"confidence must lie in [0, 1], got range [{float(conf.min())}, {float(conf.max())}]")
    edges = _edges(num_bins)
    index = torch.bucketize(conf, edges, right=False) - 1  # (lo, hi] -> bin; conf == 0 -> -1 (no bin)
    valid = index >= 0
    counts = torch.bincount(index[valid], minlength=num_bins).double()
    conf_sums = torch.bincount(index[valid], weights=conf[valid], minlength=num_bins)
    label_sums = torch.bincount(index[valid], weights=lab[valid], minlength=num_bins)
    total = torch.tensor([float(conf.numel())], dtype=torch.float64)
    return torch.cat([counts, conf_sums, label_sums, total])[None]


def ece_from_statistics(statistics: torch.Tensor, num_bins: int = 10) -> float:
    """ECE from summed :func:`calibration_bin_statistics` rows ((K, 3 * num_bins + 1) or (3 * num_bins + 1,))."""
    stats = torch.as_tensor(statistics, dtype=torch.float64).reshape(-1, 3 * num_bins + 1).sum(0)
    counts, conf_sums, label_sums = stats[:num_bins], stats[num_bins : 2 * num_bins], stats[2 * num_bins : 3 * num_bins]
    total = float(stats[-1])
    if total <= 0:
        return math.nan
    occupied = counts > 0
    gap = (conf_sums[occupied] / counts[occupied] - label_sums[occupied] / counts[occupied]).abs()
    return float((gap * counts[occupied]).sum() / total)


def expected_calibration_error(confidence: torch.Tensor, label: torch.Tensor, num_bins: int = 10) -> float:
    """ECE of pooled pixels (see the module docstring)."""
    return ece_from_statistics(calibration_bin_statistics(confidence, label, num_bins), num_bins)


class ExpectedCalibrationError(SampleSetMetric):
    """Pooled-pixel ECE; the buffer holds each image's bin statistics, ``aggregate()`` pools them all.

    Args:
        num_generations: use the first ``num_generations`` samples of each image (ECE(16)); None: all.
        num_bins: number of bins (10).
        label_channels, label_threshold: see :class:`~bundle.metrics.sample_sets.SampleSetMetric`.
    """

    def __init__(
        self,
        num_generations: int | None = None,
        num_bins: int = 10,
        label_channels: int = 1,
        label_threshold: float = 0.0,
    ) -> None:
        super().__init__(num_generations, label_channels, label_threshold)
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins

    def score(self, sample_set: SampleSet) -> torch.Tensor:
        weights = sample_set.weights.to(sample_set.samples.device, torch.float64)
        confidence = (sample_set.samples.double() * weights[:, None, None]).sum(0).clamp(0.0, 1.0)
        label_weights = sample_set.annotation_weights.to(sample_set.annotations.device)
        label = (sample_set.annotations.double() * label_weights[:, None, None]).sum(0)
        return calibration_bin_statistics(confidence, label, self.num_bins)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            return torch.tensor(math.nan)
        return torch.tensor(ece_from_statistics(data, self.num_bins))
