"""GED, HM-IoU and ECE against the reference vectors of METHODS.md section 5, as functions and as MONAI metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.handlers import IgniteMetricHandler

from bundle.metrics.ece import ExpectedCalibrationError, expected_calibration_error
from bundle.metrics.ged import GeneralizedEnergyDistance, generalized_energy_distance
from bundle.metrics.hungarian_iou import HungarianMatchedIoU, hungarian_matched_iou, matched_iou_from_distance
from bundle.metrics.sample_sets import SampleSetOutput, pairwise_iou_distance

Y1 = torch.tensor([[1, 0], [0, 0]])
Y2 = torch.tensor([[1, 1], [0, 0]])
S1, S2 = Y1, torch.zeros(2, 2, dtype=torch.long)


def masks(*items: torch.Tensor) -> torch.Tensor:
    """(K, 1, 2, 2) stack of 2x2 masks."""
    return torch.stack(items)[:, None].bool()


ANNOTATIONS = masks(Y1, Y2)
SAMPLES_A = masks(S1, S2)
SAMPLES_B = masks(S1, S2, Y2, Y2)


def test_distance_matrix_of_the_reference_vectors():
    d = pairwise_iou_distance(SAMPLES_A.flatten(2), ANNOTATIONS.flatten(2))
    np.testing.assert_allclose(d.numpy(), [[0.0, 0.5], [1.0, 1.0]], atol=1e-7)
    d_nan = pairwise_iou_distance(SAMPLES_A.flatten(2), SAMPLES_A.flatten(2), empty_pair="nan")
    assert math.isnan(float(d_nan[1, 1])) and float(d_nan[0, 1]) == 1.0


@pytest.mark.parametrize("samples, ged, hm_iou", [(SAMPLES_A, 0.5, 0.5), (SAMPLES_B, 0.125, 0.75)])
def test_reference_vectors(samples, ged, hm_iou):
    assert generalized_energy_distance(samples, ANNOTATIONS) == pytest.approx(ged, abs=1e-6)
    assert hungarian_matched_iou(samples, ANNOTATIONS) == pytest.approx(hm_iou, abs=1e-6)
    # the official Probabilistic U-Net convention: d(empty, empty) is NaN (in the sample-sample term), so GED is NaN
    assert math.isnan(generalized_energy_distance(samples, ANNOTATIONS, empty_pair="nan"))


def test_ged_with_expert_weights_equals_repeated_samples():
    # weights (3/4, 1/4) on (s1, y2) are the same distribution as the samples (s1, s1, s1, y2)
    weighted = generalized_energy_distance(masks(S1, Y2), ANNOTATIONS, sample_weights=torch.tensor([0.75, 0.25]))
    repeated = generalized_energy_distance(masks(S1, S1, S1, Y2), ANNOTATIONS)
    assert weighted == pytest.approx(repeated, abs=1e-9)
    hm_weighted = hungarian_matched_iou(masks(S1, Y2), ANNOTATIONS, sample_weights=torch.tensor([0.75, 0.25]))
    hm_repeated = hungarian_matched_iou(masks(S1, S1, S1, Y2), ANNOTATIONS)
    # matched: s1 -> y1 (mass 1/2, d 0), y2 -> y2 (1/4, d 0), s1 -> y2 (1/4, d 1/2): 1 - 1/8
    assert hm_weighted == pytest.approx(hm_repeated, abs=1e-9)
    assert hm_weighted == pytest.approx(0.875, abs=1e-9)


def test_matching_when_n_is_not_a_multiple_of_m():
    # 3 samples, 2 annotations: lcm tiling gives the optimal transport between the uniform measures
    d = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.6]])
    # OT: sample 2 splits its 1/3 mass ... optimum = 1/3*0 + 1/3*0 + 1/6*0.2 + 1/6*0.6 -> 1 - mean cost
    assert matched_iou_from_distance(d) == pytest.approx(1 - (0.2 + 0.6) / 6, abs=1e-9)
    # the LP route (non-uniform weights) agrees when given uniform weights slightly perturbed
    lp = matched_iou_from_distance(d, sample_weights=np.array([1 / 3 + 1e-9, 1 / 3, 1 / 3 - 1e-9]))
    assert lp == pytest.approx(1 - (0.2 + 0.6) / 6, abs=1e-6)


def test_ece_reference_vector():
    conf = torch.tensor([0.05, 0.15, 0.95, 0.0], dtype=torch.float64)
    label = torch.tensor([0.0, 0.25, 1.0, 0.0], dtype=torch.float64)
    assert expected_calibration_error(conf, label) == pytest.approx(0.05, abs=1e-12)


def test_ece_pools_pixels_over_images_not_per_image_mean():
    # image 1: 4 pixels, conf 0.3 with label 0.3 (calibrated); image 2: one pixel conf 0.9 with label 0.
    metric = ExpectedCalibrationError()
    samples_1 = torch.full((1, 2, 2), 0.3)
    annotations_1 = torch.tensor([[[1, 1], [1, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 0]], [[0, 0], [0, 1]]]).float()
    # annotator frequency per pixel: [[.25, .25], [.25, .25]] -> image 1 has gap |0.3 - 0.25| = 0.05 on 4 pixels
    samples_2 = torch.full((1, 1, 1), 0.9)
    annotations_2 = torch.zeros(4, 1, 1)
    metric([samples_1, samples_2], [annotations_1, annotations_2])
    pooled = (0.05 * 4 + 0.9 * 1) / 5
    assert float(metric.aggregate()) == pytest.approx(pooled, abs=1e-6)
    per_image_mean = (0.05 + 0.9) / 2
    assert abs(pooled - per_image_mean) > 0.1


def test_metric_classes_use_the_first_samples_and_weights():
    # probabilities, generation-major (N * C, H, W): the first two samples are the reference set A
    probs = torch.stack([S1, S2, Y2, Y2]).float() * 0.9 + 0.05
    annotations = torch.stack([Y1, Y2]).float() * 2 - 1  # {-1, 1} labels are accepted
    ged_2, ged_all = GeneralizedEnergyDistance(num_generations=2), GeneralizedEnergyDistance()
    hm_2, hm_all = HungarianMatchedIoU(num_generations=2), HungarianMatchedIoU()
    for metric in (ged_2, ged_all, hm_2, hm_all):
        metric([probs], [annotations])
    assert float(ged_2.aggregate()) == pytest.approx(0.5, abs=1e-6)
    assert float(ged_all.aggregate()) == pytest.approx(0.125, abs=1e-6)
    assert float(hm_2.aggregate()) == pytest.approx(0.5, abs=1e-6)
    assert float(hm_all.aggregate()) == pytest.approx(0.75, abs=1e-6)
    kohl = GeneralizedEnergyDistance(empty_pair="nan")
    kohl([probs], [annotations])
    assert math.isnan(float(kohl.aggregate()))
    with pytest.raises(ValueError, match="num_generations=5"):
        GeneralizedEnergyDistance(num_generations=5)([probs], [annotations])


def test_ignite_handler_reads_weighted_samples_from_evaluator_outputs():
    probs = torch.stack([S1, Y2]).float()
    outputs = [{"samples": probs, "weights": torch.tensor([0.75, 0.25]), "annotations": torch.stack([Y1, Y2])}]
    engine = Engine(lambda e, b: outputs)
    handler = IgniteMetricHandler(metric_fn=GeneralizedEnergyDistance(), output_transform=SampleSetOutput())
    handler.attach(engine, "ged")
    engine.run([0], max_epochs=1)
    expected = generalized_energy_distance(masks(S1, S1, S1, Y2), ANNOTATIONS)
    assert engine.state.metrics["ged"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(KeyError, match="annotations"):
        SampleSetOutput()([{"samples": probs}])
