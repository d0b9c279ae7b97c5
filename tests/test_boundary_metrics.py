"""WCov and boundary F-score (SegDiff's extra metrics) on hand-made masks with known answers."""

import numpy as np
import pytest
import torch

from bundle.metrics.boundary import (
    BoundaryFScoreMetric,
    WeightedCoverageMetric,
    boundary_f_score,
    boundary_map,
    boundary_precision_recall,
    disk,
)


def _square(size=32, top=8, left=8, side=10):
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_wcov_is_the_area_ratio_with_empty_cases():
    pred = torch.zeros(3, 1, 4, 4)
    label = -torch.ones(3, 1, 4, 4)
    pred[0, 0, :2, :2] = 0.9  # 4 predicted pixels
    label[0, 0, :2, :3] = 1  # 6 true pixels (overlap does not matter for WCov)
    label[1, 0, 0, 0] = 1  # prediction empty, one true pixel -> 0
    metric = WeightedCoverageMetric()  # image 2: both empty -> empty_score 1
    metric(pred, label)
    assert metric.get_buffer().flatten().tolist() == pytest.approx([4 / 6, 0.0, 1.0])
    assert metric.aggregate().item() == pytest.approx((4 / 6 + 0 + 1) / 3)


def test_boundary_map_of_a_single_pixel_is_the_2x2_block_towards_the_origin():
    mask = np.zeros((8, 8), dtype=bool)
    mask[4, 5] = True
    assert set(zip(*np.nonzero(boundary_map(mask)))) == {(3, 4), (3, 5), (4, 4), (4, 5)}


def test_disk_footprint():
    assert disk(1).sum() == 5 and disk(2).sum() == 13 and disk(3).sum() == 29


def test_boundary_f_of_two_pixels_three_columns_apart():
    # boundaries {(9..10) x (9..10)} and {(9..10) x (12..13)}: two pixels of each within 2 px, all within 3 px
    pred, truth = np.zeros((24, 24), bool), np.zeros((24, 24), bool)
    pred[10, 10] = True
    truth[10, 13] = True
    expected = {1: 0.0, 2: 0.5, 3: 1.0, 4: 1.0, 5: 1.0}
    for tolerance, f in expected.items():
        assert boundary_f_score(pred, truth, [tolerance]) == pytest.approx(f)
    assert boundary_f_score(pred, truth) == pytest.approx(0.7)  # mean over tolerances 1..5


def test_boundary_f_known_cases():
    square = _square()
    assert boundary_f_score(square, square) == 1.0
    # a one-pixel shift keeps every boundary pixel within 1 px
    assert boundary_f_score(np.roll(square, 1, axis=1), square) == 1.0
    # far apart: nothing matches
    assert boundary_f_score(_square(top=0, left=0, side=6), _square(top=24, left=24, side=6)) == 0.0
    # one of two equal true objects found: precision 1, recall 1/2 -> F = 2/3 at every tolerance
    both = _square(64, 5, 5, 10) | _square(64, 40, 40, 10)
    assert boundary_precision_recall(_square(64, 5, 5, 10), both, 3) == (1.0, 0.5)
    assert boundary_f_score(_square(64, 5, 5, 10), both) == pytest.approx(2 / 3)
    # empty prediction: precision 1, recall 0 -> F 0; both empty -> 1
    empty = np.zeros_like(square)
    assert boundary_f_score(empty, square) == 0.0
    assert boundary_f_score(empty, empty) == 1.0


def test_boundary_f_agrees_with_brute_force_distances():
    rng = np.random.default_rng(0)
    for _ in range(3):
        pred = rng.random((20, 20)) > 0.7
        truth = rng.random((20, 20)) > 0.6
        bp, bt = np.argwhere(boundary_map(pred)), np.argwhere(boundary_map(truth))
        dist = np.sqrt(((bp[:, None, :] - bt[None, :, :]) ** 2).sum(-1))
        scores = []
        for tol in range(1, 6):
            precision = (dist.min(1) <= tol).mean()
            recall = (dist.min(0) <= tol).mean()
            scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
        assert boundary_f_score(pred, truth) == pytest.approx(float(np.mean(scores)))


def test_boundary_metric_per_image_from_probabilities_and_signed_labels():
    square = torch.from_numpy(_square()).float()
    pred = torch.stack([square * 0.8, torch.zeros_like(square)])[:, None]  # image 1 predicts nothing
    label = torch.stack([square, square])[:, None] * 2 - 1
    metric = BoundaryFScoreMetric()
    metric(pred, label)
    assert metric.get_buffer().flatten().tolist() == pytest.approx([1.0, 0.0])
    assert metric.aggregate().item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differs from label shape"):
        metric(pred, label[:, :, :10])
