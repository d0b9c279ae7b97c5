"""One number per image from an ensemble's uncertainty map, for ranking images (active learning, triage).

``foreground_uncertainty``: the mean of the per-pixel standard deviation of the generations inside the predicted
foreground, or over the whole image when nothing is predicted. Inside the foreground, because that is the structure
an annotator would correct, and because a mean over the whole image ranks images by how much background they hold
(a small hippocampus in a large field of view would look certain). MONAI Label's ``/activelearning/uncertain``
(apps/monailabel) ranks by it; ``tools/uncertainty_ranking.py`` measures how well it predicts the Dice.
"""

from __future__ import annotations

import numpy as np


def foreground_uncertainty(uncertainty: np.ndarray, label: np.ndarray) -> float:
    """Mean of ``uncertainty`` where ``label > 0`` (the whole image when the label is empty)."""
    uncertainty, label = np.asarray(uncertainty, dtype=np.float64), np.asarray(label)
    if uncertainty.shape != label.shape:
        raise ValueError(f"uncertainty of shape {uncertainty.shape} for a label of shape {label.shape}")
    foreground = label > 0
    return float(uncertainty[foreground].mean() if foreground.any() else uncertainty.mean())
