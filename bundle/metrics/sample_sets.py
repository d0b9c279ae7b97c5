"""Sets of segmentation samples and annotations: the input of the distribution metrics (GED, HM-IoU, ECE).

A stochastic method gives N samples per image (foreground probabilities, optionally with weights that sum to 1, e.g.
MoSE's expert weights); a multi-annotator dataset gives M annotations per image (LIDC: 4). The metrics in
``bundle.metrics.ged``, ``bundle.metrics.hungarian_iou`` and ``bundle.metrics.ece`` compare the two sets image by
image. This module holds what they share:

- :class:`SampleSet`: one image's samples (N, C, P) probabilities in [0, 1] with weights (N,), annotations
  (M, C, P) in {0, 1} with weights (M,); C label channels, P pixels.
- :func:`pairwise_iou_distance`: d = 1 - IoU between two sets of binary masks, with either convention for two empty
  masks ("zero" as MoSE, "nan" as the official Probabilistic U-Net code).
- :class:`SampleSetMetric`: the ``CumulativeIterationMetric`` base class. ``metric(y_pred, y)`` takes, per image,
  ``y_pred`` = samples (N * C, H, W) generation-major (the ``samples`` output of ``EnsembleInferer``
  for every method) or a mapping ``{"samples": ..., "weights": (N,)}``, and ``y`` = annotations (M * C, H, W) with
  values in {0, 1} or {-1, 1}; batch-first tensors (B, N * C, H, W) / (B, M * C, H, W) work too.
- :class:`SampleSetOutput`: the ``output_transform`` that picks these from a MONAI evaluator's output.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric

__all__ = [
    "EMPTY_PAIR_CONVENTIONS",
    "SampleSet",
    "check_empty_pair",
    "pairwise_iou_distance",
    "make_sample_set",
    "SampleSetMetric",
    "SampleSetOutput",
]

#: "zero": d(empty, empty) = 0 (MoSE, IoU with 1e-8 added to both terms); "nan": undefined (official Prob. U-Net)
EMPTY_PAIR_CONVENTIONS = ("zero", "nan")
_EPS = 1e-8


@dataclass
class SampleSet:
    """One image's samples and annotations, pixels flattened.

    Attributes:
        samples: (N, C, P) foreground probabilities in [0, 1].
        weights: (N,) float64 sample weights, summing to 1.
        annotations: (M, C, P) bool masks.
        annotation_weights: (M,) float64, summing to 1 (uniform).
    """

    samples: torch.Tensor
    weights: torch.Tensor
    annotations: torch.Tensor
    annotation_weights: torch.Tensor

    def binary_samples(self, threshold: float = 0.5) -> torch.Tensor:
        """(N, C, P) bool: p > threshold (exactly 0.5 is background, as argmax of two equal softmax scores)."""
        return self.samples > threshold


def check_empty_pair(empty_pair: str) -> str:
    """``empty_pair`` itself, or a ValueError naming the accepted conventions."""
    if empty_pair not in EMPTY_PAIR_CONVENTIONS:
        raise ValueError(f"empty_pair must be one of {EMPTY_PAIR_CONVENTIONS}, got {empty_pair!r}")
    return empty_pair


def pairwise_iou_distance(a: torch.Tensor, b: torch.Tensor, empty_pair: str = "zero") -> torch.Tensor:
    """d(a_i, b_j) = 1 - IoU for binary masks a (N, C, P) and b (M, C, P); returns (N, M) float64.

    IoU is computed per channel and the distance averaged over channels. ``empty_pair="zero"`` uses MoSE's
    (|a & b| + 1e-8) / (|a | b| + 1e-8), so two empty masks are at distance 0 and an empty against a non-empty one
    at about 1; ``"nan"`` leaves 0 / 0 undefined (NaN) and averages channels NaN-aware, as the official code.
    """
    check_empty_pair(empty_pair)
    if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"masks must be (N, C, P) and (M, C, P) with equal C, P; got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    af = a.permute(1, 0, 2).to(torch.float32)  # (C, N, P); counts below 2**24 are exact in float32
    bf = b.permute(1, 0, 2).to(torch.float32)
    inter = torch.bmm(af, bf.transpose(1, 2)).double()  # (C, N, M)
    union = af.sum(-1).double()[:, :, None] + bf.sum(-1).double()[:, None, :] - inter
    if empty_pair == "zero":
        distance = 1.0 - (inter + _EPS) / (union + _EPS)
        return distance.mean(0)
    distance = 1.0 - inter / union  # 0 / 0 -> NaN
    return torch.nanmean(distance, dim=0)


def _uniform(n: int) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{what} must be a tensor, got {type(value).__name__}") from err
    return value.detach()


def make_sample_set(
    samples: torch.Tensor,
    annotations: torch.Tensor,
    weights: torch.Tensor | None = None,
    label_channels: int = 1,
    num_generations: int | None = None,
    label_threshold: float = 0.0,
) -> SampleSet:
    """Build one image's :class:`SampleSet`.

    Args:
        samples: (N * C, *spatial) probabilities, generation-major (sample n is rows n*C .. n*C + C - 1).
        annotations: (M * C, *spatial) masks; a value > ``label_threshold`` is foreground ({0, 1} or {-1, 1}).
        weights: (N,) non-negative sample weights (normalised here); None means uniform.
        label_channels: C.
        num_generations: use only the first ``num_generations`` samples (their weights renormalised); None uses all.
        label_threshold: foreground threshold of the annotations.
    """
    samples, annotations = _as_tensor(samples, "samples"), _as_tensor(annotations, "annotations")
    c = int(label_channels)
    if samples.ndim < 2 or samples.shape[0] % c or annotations.shape[0] % c:
        raise ValueError(
            f"samples {tuple(samples.shape)} and annotations {tuple(annotations.shape)} must be (N * {c}, ...) and "
            f"(M * {c}, ...) with label_channels={c}"
        )
    if samples.shape[1:] != annotations.shape[1:]:
        raise ValueError(
            f"samples spatial shape {tuple(samples.shape[1:])} differs from annotations {tuple(annotations.shape[1:])}"
        )
    n, m = samples.shape[0] // c, annotations.shape[0] // c
    if n == 0 or m == 0:
        raise ValueError(f"need at least one sample and one annotation, got N={n}, M={m}")
    w = _uniform(n) if weights is None else _as_tensor(weights, "weights").double().flatten().cpu()
    if w.numel() != n:
        raise ValueError(f"got {w.numel()} weights for {n} samples")
    if num_generations is not None:
        if num_generations < 1 or num_generations > n:
            raise ValueError(f"num_generations={num_generations} but the inferer gave {n} samples per image")
        samples, w, n = samples[: num_generations * c], w[:num_generations], int(num_generations)
    if (w < 0).any() or not torch.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"sample weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return SampleSet(
        samples=samples.float().reshape(n, c, -1),
        weights=w / w.sum(),
        annotations=(annotations > label_threshold).reshape(m, c, -1),
        annotation_weights=_uniform(m),
    )


class SampleSetMetric(CumulativeIterationMetric):
    """Base class: one row of scores per image from its :class:`SampleSet`; see the module docstring for inputs.

    Args:
        num_generations: score only the first ``num_generations`` samples of each image (e.g. 16 of 100); None: all.
        label_channels: label channels C of samples and annotations.
        label_threshold: annotations are foreground where > this (0.0 serves {0, 1} and {-1, 1}).
    """

    def __init__(
        self, num_generations: int | None = None, label_channels: int = 1, label_threshold: float = 0.0
    ) -> None:
        super().__init__()
        self.num_generations = num_generations
        self.label_channels = label_channels
        self.label_threshold = label_threshold

    @abstractmethod
    def score(self, sample_set: SampleSet) -> torch.Tensor:
        """(1, K) float tensor for one image."""

    def _set(self, y_pred: Any, y: Any) -> SampleSet:
        weights = None
        if isinstance(y_pred, Mapping):
            if "samples" not in y_pred:
                raise KeyError(f"a mapping prediction needs a 'samples' entry, got keys {sorted(y_pred)}")
            weights = y_pred.get("weights")
            y_pred = y_pred["samples"]
        return make_sample_set(y_pred, y, weights, self.label_channels, self.num_generations, self.label_threshold)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError(f"{type(self).__name__} needs the annotations as y")
        return torch.cat([self.score(self._set(p, t)) for p, t in zip(y_pred, y)])

    def _compute_list(self, y_pred: Sequence, y: Sequence | None = None, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError(f"{type(self).__name__} needs the annotations as y")
        if len(y_pred) != len(y):
            raise ValueError(f"got {len(y_pred)} predictions for {len(y)} annotation sets")
        return torch.cat([self.score(self._set(p, t)) for p, t in zip(y_pred, y)])


class SampleSetOutput:
    """``output_transform`` for ``IgniteMetricHandler``: (per-image predictions, per-image annotations).

    A prediction is ``item[samples_key]``, or ``{"samples": ..., "weights": item[weights_key]}`` when the item has
    weights (MoSE's weighted evaluation). Works on decollated outputs (a list of dicts) and on a batch dict.
    """

    def __init__(
        self, samples_key: str = "samples", annotations_key: str = "annotations", weights_key: str | None = "weights"
    ) -> None:
        self.samples_key = samples_key
        self.annotations_key = annotations_key
        self.weights_key = weights_key

    def _item(self, item: Mapping) -> tuple[Any, Any]:
        for key in (self.samples_key, self.annotations_key):
            if key not in item:
                raise KeyError(
                    f"evaluator output has no {key!r} (keys: {sorted(map(str, item))}); the inferer must return "
                    "samples and the data must carry all annotations (see configs/datasets/lidc.yaml)"
                )
        prediction = item[self.samples_key]
        if self.weights_key is not None and item.get(self.weights_key) is not None:
            prediction = {"samples": prediction, "weights": item[self.weights_key]}
        return prediction, item[self.annotations_key]

    def __call__(self, output: Any) -> tuple[list, list]:
        if isinstance(output, Mapping):
            batch = output[self.samples_key].shape[0]
            output = [
                {k: (v[i] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in output.items()}
                for i in range(batch)
            ]
        pairs = [self._item(item) for item in output]
        return [p for p, _ in pairs], [a for _, a in pairs]


class BinarySampleSetMetric(SampleSetMetric):
    """A :class:`SampleSetMetric` on binarised samples with an IoU-based distance (GED, HM-IoU).

    Args:
        num_generations, label_channels, label_threshold: see :class:`SampleSetMetric`.
        empty_pair: "zero" (MoSE, default) or "nan" (official Probabilistic U-Net): the distance of two empty masks.
        threshold: sample probabilities > threshold are foreground.
    """

    def __init__(
        self,
        num_generations: int | None = None,
        empty_pair: str = "zero",
        threshold: float = 0.5,
        label_channels: int = 1,
        label_threshold: float = 0.0,
    ) -> None:
        super().__init__(num_generations, label_channels, label_threshold)
        self.empty_pair = check_empty_pair(empty_pair)
        self.threshold = threshold
