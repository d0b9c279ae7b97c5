"""Per-image Dice / IoU / precision / recall at the 0.5 threshold of the ensemble mean."""

import math

import numpy as np
import pytest
import torch

from bundle.metrics.binary import PerImageBinaryMetric, binary_scores, confusion_counts


def _masks():
    pred = torch.zeros(2, 1, 4, 4)
    label = -torch.ones(2, 1, 4, 4)  # labels in {-1, 1}
    pred[0, 0, :2, :2] = 0.9  # 4 predicted
    label[0, 0, :2, :3] = 1  # 6 true, 4 overlap
    pred[1, 0, 0, 0] = 0.5  # exactly 0.5 rounds to background
    return pred, label


def test_counts_and_scores_match_hand_computation():
    pred, label = _masks()
    tp, fp, fn = confusion_counts(pred, label)
    assert tp.flatten().tolist() == [4, 0] and fp.flatten().tolist() == [0, 0] and fn.flatten().tolist() == [2, 0]
    dice = binary_scores(tp, fp, fn, "dice")
    assert dice[0, 0].item() == pytest.approx(8 / 10)
    assert binary_scores(tp, fp, fn, "iou")[0, 0].item() == pytest.approx(4 / 6)
    assert binary_scores(tp, fp, fn, "precision")[0, 0].item() == pytest.approx(1.0)
    assert binary_scores(tp, fp, fn, "recall")[0, 0].item() == pytest.approx(4 / 6)


@pytest.mark.parametrize("empty_score", [0.0, 1.0])
def test_empty_pair_policy_and_per_image_mean(empty_score):
    pred, label = _masks()
    metric = PerImageBinaryMetric("dice", empty_score=empty_score)
    metric(pred, label)
    assert metric.get_buffer().flatten().tolist() == pytest.approx([0.8, empty_score])
    assert metric.aggregate().item() == pytest.approx((0.8 + empty_score) / 2)


def test_nan_policy_leaves_empty_images_out():
    pred, label = _masks()
    metric = PerImageBinaryMetric("iou", empty_score=math.nan)
    metric(pred, label)
    assert metric.aggregate().item() == pytest.approx(4 / 6)


def test_agrees_with_independent_numpy_computation():
    rng = np.random.default_rng(3)
    probs = rng.random((5, 1, 16, 16)).astype(np.float32)
    labels = (rng.random((5, 1, 16, 16)) > 0.6).astype(np.float32)
    metric = PerImageBinaryMetric("dice")
    metric(torch.from_numpy(probs), torch.from_numpy(labels * 2 - 1))
    expected = []
    for p, y in zip(probs, labels):
        p, y = np.round(p).astype(bool).ravel(), y.astype(bool).ravel()  # round(): 0.5 -> 0 as the reference
        expected.append(2 * (p & y).sum() / (p.sum() + y.sum()))
    assert metric.aggregate().item() == pytest.approx(float(np.mean(expected)), rel=1e-6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differs"):
        confusion_counts(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
