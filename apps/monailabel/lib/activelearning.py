"""Active learning from the ensemble's own uncertainty: propose the unlabelled image the served model is least sure of.

A diffusion ensemble draws N segmentations of each image; where they disagree, the model does not know. Every
inference of a datastore image stores that image's score (``bundle.metrics.uncertainty.foreground_uncertainty``:
the mean per-pixel standard deviation of the generations inside the predicted foreground) in the datastore's image info,
under ``uncertainty_score`` -> model name, with the ensemble size and the time. ``MostUncertain`` ranks the
unlabelled images by those cached scores, so ``/activelearning/uncertain`` answers without running a model;
images not scored yet by that model come after the scored ones, in the datastore's order.

MONAI Label's stock strategies are ``random`` and ``first`` (kept beside it) and a dropout-based epistemic score
for networks with dropout, which these networks do not need: their generations already are samples.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)

SCORE_KEY = "uncertainty_score"


def cached_score(info: dict[str, Any], model: str) -> float | None:
    """The score ``model`` stored for an image (its datastore info), or None."""
    entry = (info or {}).get(SCORE_KEY, {}).get(model)
    return float(entry["score"]) if isinstance(entry, dict) and entry.get("score") is not None else None


def score_entry(score: float, generations: int | None) -> dict[str, Any]:
    return {"score": float(score), "num_generations": generations, "ts": int(time.time())}


class MostUncertain(Strategy):
    """The unlabelled image with the highest cached ensemble-uncertainty score of one model."""

    def __init__(self, default_model: str) -> None:
        super().__init__(
            "The unlabelled image whose diffusion ensemble disagrees most inside its predicted foreground "
            "(scores cached by every inference of a datastore image; request option 'model')"
        )
        self.default_model = default_model

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any] | None:
        model = request.get("model") or self.default_model
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        scored, unscored = [], []
        for image in images:
            score = cached_score(datastore.get_image_info(image), model)
            (unscored if score is None else scored).append((score, image))
        if scored:
            score, image = max(scored, key=lambda pair: pair[0])
            logger.info(f"uncertain ({model}): {image} with score {score:.5f} among {len(scored)} scored images")
            return {"id": image, "score": score, "model": model, "scored": len(scored), "unscored": len(unscored)}
        image = unscored[0][1]
        logger.info(f"uncertain ({model}): no unlabelled image scored yet; proposing {image}")
        return {"id": image, "score": None, "model": model, "scored": 0, "unscored": len(unscored)}
