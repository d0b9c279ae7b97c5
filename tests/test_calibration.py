"""Calibration score (10 uniform bins of the ensemble mean probability) on constructed cases."""

import pytest
import torch

from bundle.metrics.calibration import CalibrationScoreMetric, calibration_bins, calibration_error


def test_constructed_case():
    # bin 0: p = 0.05 twice, one of two foreground -> |0.05 - 0.5| * 2/4; bin 9: p = 0.95 twice, both foreground
    # -> |0.95 - 1| * 2/4; total 0.225 + 0.025
    prob = torch.tensor([0.05, 0.05, 0.95, 0.95]).reshape(1, 1, 2, 2)
    label = torch.tensor([-1.0, 1.0, 1.0, 1.0]).reshape(1, 1, 2, 2)
    assert calibration_error(prob, label).item() == pytest.approx(0.25)


def test_perfectly_calibrated_and_worst_cases():
    # ten pixels at p = 0.3 of which three are foreground: calibrated
    prob = torch.full((1, 1, 1, 10), 0.3)
    label = torch.tensor([1.0] * 3 + [0.0] * 7).reshape(1, 1, 1, 10)
    assert calibration_error(prob, label).item() == pytest.approx(0.0, abs=1e-6)
    # confident and always wrong: p = 1 on background and p = 0 on foreground -> 1
    prob = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    label = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2)
    assert calibration_error(prob, label).item() == pytest.approx(1.0)


def test_bin_edges_zero_and_one_are_binned():
    prob = torch.tensor([0.0, 0.1, 0.0999, 1.0]).reshape(1, 1, 1, 4)
    counts, conf, labels = calibration_bins(prob, torch.zeros_like(prob))
    assert counts[0, 0].tolist() == [2, 1] + [0] * 7 + [1]
    assert conf[0, 0, 9].item() == 1.0


def test_metric_is_mean_over_images():
    prob = torch.stack([torch.full((1, 2, 2), 0.05), torch.full((1, 2, 2), 0.95)])
    label = -torch.ones_like(prob)  # all background: errors 0.05 and 0.95
    metric = CalibrationScoreMetric(num_bins=10)
    metric(prob, label)
    assert metric.get_buffer().flatten().tolist() == pytest.approx([0.05, 0.95])
    assert metric.aggregate().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric(prob * 2, label)
