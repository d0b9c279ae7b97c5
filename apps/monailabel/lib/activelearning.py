"""Active learning from the ensemble's own uncertainty: propose the unlabelled image the served model is least sure of.

A diffusion ensemble draws N segmentations of each image; where they disagree, the model does not know. Every
inference of a datastore image stores that image's score (``bundle.metrics.uncertainty.foreground_uncertainty``:
the mean per-pixel standard deviation of the generations inside the predicted foreground) in the datastore's image info,
under ``uncertainty_score`` -> model name, with the ensemble size and the time. ``MostUncertain`` ranks the
unlabelled images by those cached scores, so ``/activelearning/uncertain`` answers without running a model;
images not scored yet by that model come after the scored ones, in the datastore's order.

After a training, the cached scores of that model describe weights it no longer has: ``RefreshUncertaintyScores``
(the scoring method ``uncertainty``) infers again every unlabelled image whose score is older than its model's
``model.pt`` (``"all": true`` in the request also scores the images never scored), and the app runs it at the end of
every training task (``main.py``). MONAI Label's own trigger, which runs every scoring method after each
``/activelearning`` call and at start-up in a fresh process that loads every model, is off in this app: only a
training makes scores stale.

MONAI Label's stock strategies are ``random`` and ``first`` (kept beside it) and a dropout-based epistemic score
for networks with dropout, which these networks do not need: their generations already are samples.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)

SCORE_KEY = "uncertainty_score"


def cached_score(info: dict[str, Any], model: str) -> float | None:
    """The score ``model`` stored for an image (its datastore info), or None."""
    entry = (info or {}).get(SCORE_KEY, {}).get(model)
    return float(entry["score"]) if isinstance(entry, dict) and entry.get("score") is not None else None


def score_entry(score: float, generations: int | None) -> dict[str, Any]:
    return {"score": float(score), "num_generations": generations, "ts": round(time.time(), 3)}


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


class RefreshUncertaintyScores(ScoringMethod):
    """Re-score the unlabelled images whose cached score predates their model's weights (module docstring).

    Args:
        infer: the app's ``infer(request, datastore)``, which caches the new score as any inference does.
        weights: model name -> path of the weights it serves (``<bundle>/models/model.pt``).
    """

    def __init__(self, infer: Callable[[dict, Datastore], dict], weights: dict[str, str]) -> None:
        super().__init__(
            "Infer again the unlabelled images whose cached uncertainty score is older than their model's weights "
            "(request options 'model', 'all': also the images never scored)"
        )
        self.infer = infer
        self.weights = dict(weights)

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        models = [request["model"]] if request.get("model") else list(self.weights)
        unknown = [m for m in models if m not in self.weights]
        if unknown:
            raise ValueError(f"scoring 'uncertainty': no model {unknown}; this server serves {sorted(self.weights)}")
        everything = str(request.get("all", False)).lower() in ("true", "1", "yes")
        result: dict[str, Any] = {}
        failed: dict[str, str] = {}
        for model in models:
            trained = os.path.getmtime(self.weights[model])
            refreshed = []
            for image in datastore.get_unlabeled_images():
                entry = (datastore.get_image_info(image) or {}).get(SCORE_KEY, {}).get(model)
                if entry is None and not everything:
                    continue
                if entry is not None and float(entry.get("ts", 0)) >= trained:
                    continue
                generations = (entry or {}).get("num_generations")
                try:
                    self.infer(
                        {"model": model, "image": image, **({"num_generations": generations} if generations else {})},
                        datastore,
                    )
                except Exception as err:  # noqa: BLE001 - reported; the other images are scored all the same
                    logger.warning(f"uncertainty scores of {model}: image '{image}' not scored again: {err}")
                    failed[image] = str(err)
                    continue
                refreshed.append(image)
            logger.info(f"uncertainty scores of {model}: {len(refreshed)} images scored again")
            result[model] = refreshed
        if failed:
            result["failed"] = failed
        return result
