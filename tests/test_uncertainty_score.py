"""The per-image uncertainty score that ranks images for annotation (bundle.metrics.uncertainty) and the ranking
statistics of tools/uncertainty_ranking.py."""

import sys
from pathlib import Path

import numpy as np
import pytest

from bundle.metrics.uncertainty import foreground_uncertainty

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import uncertainty_ranking  # noqa: E402


def test_the_score_is_the_mean_inside_the_predicted_foreground():
    u = np.zeros((4, 4), np.float32)
    u[0, 0], u[3, 3] = 0.4, 0.2
    label = np.zeros((4, 4), np.uint8)
    label[0, :2] = 1  # predicted foreground: (0, 0) and (0, 1)
    assert foreground_uncertainty(u, label) == pytest.approx(0.2)
    # more background does not dilute it: the same structure in a field of view 4x as large
    big_u, big_label = np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8)
    big_u[:4, :4], big_label[:4, :4] = u, label
    assert foreground_uncertainty(big_u, big_label) == pytest.approx(0.2)
    # several classes count as foreground; an empty prediction falls back to the whole image
    assert foreground_uncertainty(u, label * 2) == pytest.approx(0.2)
    assert foreground_uncertainty(u, np.zeros_like(label)) == pytest.approx(0.6 / 16)
    with pytest.raises(ValueError, match="shape"):
        foreground_uncertainty(u, label[:2])


def test_ranking_statistics():
    truth = np.array([0, 1, 1, 2, 2, 2])
    assert uncertainty_ranking.dice_per_class(np.array([0, 1, 0, 2, 2, 2]), truth, [1, 2]) == [
        pytest.approx(2 / 3),
        1.0,
    ]
    result = uncertainty_ranking.spearman([0.1, 0.2, 0.3, 0.4], [0.9, 0.8, 0.85, 0.5])
    assert result["rho"] == pytest.approx(-0.8) and result["n"] == 4
