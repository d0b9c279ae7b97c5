"""MONAI Label app serving the bundle's diffusion segmentation models.

Every folder under the app's ``model/`` directory (or the folder given by ``--conf bundles <dir>``) that holds an
exported bundle (``tools/export_monailabel_bundle.py``: ``configs/inference.yaml``, ``configs/metadata.json``,
``models/model.pt``) becomes an infer model of the folder's name; those with ``configs/train.yaml`` can also be
fine-tuned from the datastore's labelled images with MONAI Label's stock ``BundleTrainTask``.

The weights the repository ships (``pretrained/<name>/`` with ``model.pt`` and ``export.json``, e.g. the
Hippocampus cDAL) are exported into that folder at start-up when it has no bundle of that name, so a fresh clone
serves a real model without training (``--conf pretrained false`` turns this off).

    monailabel start_server --app apps/monailabel --studies <images> --conf zoo_source github \\
        --host 127.0.0.1 --port 8000 [--conf bundles <exported bundles>] [--conf models a,b]

Errors a client causes come back as HTTP errors with a message, and the server keeps serving: 400 for an image
id that holds a path (``../x``), 403 for a path outside the datastore and the upload folder, 404 for an image id
the datastore does not hold, 413 for an image past the server's limits (``--conf max_image_voxels N``, from the
header before decoding; ``--conf max_upload_mb N``), 422 for an image the model cannot take (empty, truncated,
unreadable, wrong dimensionality or channels, non-finite values) or a bad option (lib/request_checks.py,
lib/ensemble_task.py).

Volumes come as NIfTI, NRRD or MetaImage files, or a DICOM series as a ZIP archive of its files
(``lib/dicom_series.py``: unpacked with limits, one series per request); the label comes back in the input's format
and geometry (a DICOM SEG for a series) or as the request's ``result_extension``. Requests are served one at a time in the order they arrive (MONAI Label runs inference on
its event loop), so concurrent clients wait rather than share a model mid-call.
"""

from __future__ import annotations

import logging
import os
import sys

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.tasks.train.bundle import BundleTrainTask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib.activelearning import SCORE_KEY, MostUncertain, RefreshUncertaintyScores, score_entry  # noqa: E402
from lib.dicom_series import is_series_archive, remove_series, unpack_series  # noqa: E402
from lib.ensemble_task import EnsembleBundleInferTask  # noqa: E402
from lib.request_checks import (  # noqa: E402
    DEFAULT_MAX_IMAGE_VOXELS,
    DEFAULT_MAX_UPLOAD_MB,
    RequestRefusedError,
    conf_limit,
    display_name,
    resolve_image,
    size_problem,
)

logger = logging.getLogger(__name__)

UNCERTAINTY_TAG = "uncertainty"


def export_shipped_models(bundles_dir: str) -> list[str]:
    """Export every shipped model the folder lacks (``tools/export_monailabel_bundle.py``'s ``export_shipped``)."""
    import importlib.util

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location(
        "export_monailabel_bundle", os.path.join(repo, "tools", "export_monailabel_bundle.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    exported = module.export_shipped(bundles_dir)
    for name in exported:
        logger.info(f"exported the shipped model {name} into {os.path.join(bundles_dir, name)}")
    return exported


class DiffusionSegmentationApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundles_dir = os.path.abspath(conf.get("bundles") or os.path.join(app_dir, "model"))
        if conf.get("pretrained", "true").lower() not in ("false", "0", "no", "off"):
            os.makedirs(self.bundles_dir, exist_ok=True)
            export_shipped_models(self.bundles_dir)
        found = (
            sorted(
                d
                for d in os.listdir(self.bundles_dir)
                if os.path.isfile(os.path.join(self.bundles_dir, d, "configs", "inference.yaml"))
            )
            if os.path.isdir(self.bundles_dir)
            else []
        )
        wanted = [m.strip() for m in conf.get("models", "all").split(",") if m.strip()]
        unknown = [m for m in wanted if m != "all" and m not in found]
        if unknown:
            raise ValueError(f"--conf models: {unknown} not among the bundles in {self.bundles_dir}: {found}")
        self.models = found if "all" in wanted else wanted
        self.max_image_voxels = int(conf_limit(conf, "max_image_voxels", DEFAULT_MAX_IMAGE_VOXELS))
        self.max_upload_mb = conf_limit(conf, "max_upload_mb", DEFAULT_MAX_UPLOAD_MB)
        if not self.models:
            raise ValueError(f"no exported bundles in {self.bundles_dir} (tools/export_monailabel_bundle.py)")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="diffseg",
            description="Diffusion segmentation ensembles (cDAL, SegDiff) with per-pixel uncertainty",
            version="0.1.0",
        )
        # MONAI Label would run every scoring method after each /activelearning call and at start-up, each time in
        # a new process that loads every model; scores only go stale when a model is trained (train() below)
        self._auto_update_scoring = False

    def init_infers(self):
        infers = {}
        for name in self.models:
            task = EnsembleBundleInferTask(os.path.join(self.bundles_dir, name), self.conf)
            if not task.is_valid():
                raise ValueError(f"{os.path.join(self.bundles_dir, name)}: not a servable bundle (see the log)")
            infers[name] = task
        return infers

    def init_strategies(self):
        from monailabel.tasks.activelearning.first import First
        from monailabel.tasks.activelearning.random import Random

        default = self.conf.get("uncertainty_model") or self.models[0]
        if default not in self.models:
            raise ValueError(f"--conf uncertainty_model {default!r}: not among the served models {self.models}")
        return {"uncertain": MostUncertain(default), "random": Random(), "first": First()}

    def init_scoring_methods(self):
        weights = {name: os.path.join(self.bundles_dir, name, "models", "model.pt") for name in self.models}
        return {"uncertainty": RefreshUncertaintyScores(self.infer, weights)}

    def train(self, request):
        """MONAI Label's training task, then the cached uncertainty scores of the trained model made current
        (``lib/activelearning.py``); this runs in the training task's own process."""
        result = super().train(request)
        model = request.get("model")
        if self._scoring_methods:  # the named model, or every model when the request trained them all
            self.scoring({"method": "uncertainty", **({"model": model} if model else {})})
        return result

    def init_trainers(self):
        return {
            name: BundleTrainTask(os.path.join(self.bundles_dir, name), self.conf)
            for name in self.models
            if os.path.isfile(os.path.join(self.bundles_dir, name, "configs", "train.yaml"))
        }

    def _readable_roots(self, datastore) -> list[str]:
        """Folders an infer request may name a path in besides the uploads': the datastore's and the sessions'."""
        roots = [self.studies]
        image_path = getattr(getattr(datastore, "_datastore", None), "image_path", None)
        if callable(image_path):
            roots.append(image_path())
        if getattr(self, "_sessions", None) is not None:
            roots.append(self._sessions.store_path)
        return [r for r in roots if isinstance(r, str) and r and "://" not in r]

    def _check_image(self, image, datastore) -> str | None:
        """Refuse (``RequestRefusedError``) an image the server may not read, an empty one or one past the limits;
        for a ZIP archive of a DICOM series, the folder it was unpacked into (``lib/dicom_series.py``)."""
        resolve_image(image, datastore.list_images(), self._readable_roots(datastore))
        path = image if os.path.isabs(image) else datastore.get_image_uri(image)
        if path and os.path.exists(path):
            refused = size_problem(path, display_name(image), self.max_image_voxels, self.max_upload_mb)
            if refused is not None:
                raise refused
            if is_series_archive(path):
                return unpack_series(path, display_name(image), int(self.max_upload_mb * 2**20))
        return None

    def infer(self, request, datastore=None):
        datastore = datastore if datastore else self.datastore()
        if request.get("model") not in self._infers:
            raise HTTPException(
                status_code=404, detail=f"no model '{request.get('model')}'; this server serves {sorted(self._infers)}"
            )
        image = request.get("image")
        series = None
        if isinstance(image, str) or image is None:
            try:
                series = self._check_image(image, datastore)
            except RequestRefusedError as err:
                raise HTTPException(status_code=err.status, detail=err.message) from None
        try:
            result = super().infer({**request, "image": series} if series else request, datastore)
        except MONAILabelException as err:
            status = 422 if err.error == MONAILabelError.INVALID_INPUT else 500
            raise HTTPException(status_code=status, detail=err.msg) from err
        except HTTPException:
            raise
        except Exception as err:  # noqa: BLE001 - reported to the client with its message
            logger.exception("inference failed")
            raise HTTPException(status_code=500, detail=f"inference failed: {type(err).__name__}: {err}") from err
        finally:
            if series:
                remove_series(series)
        params = result.get("params") or {}
        uncertainty = params.get("uncertainty")
        if uncertainty and isinstance(image, str) and not os.path.exists(image):
            # the image lives in the datastore: keep its uncertainty map there, next to its labels
            path = uncertainty.pop("file")
            uncertainty["label_id"] = datastore.save_label(
                image, path, UNCERTAINTY_TAG, {"model": request.get("model"), "kind": "uncertainty"}
            )
            uncertainty["tag"] = UNCERTAINTY_TAG
            os.remove(path)
            if uncertainty.get("score") is not None:  # the active-learning cache (lib/activelearning.py)
                scores = dict(datastore.get_image_info(image).get(SCORE_KEY, {}))
                scores[request.get("model")] = score_entry(uncertainty["score"], params.get("num_generations"))
                datastore.update_image_info(image, {SCORE_KEY: scores})
        return result
