"""MONAI Label infer task for the bundle's diffusion ensembles.

``EnsembleBundleInferTask`` is MONAI Label's own ``BundleInferTask`` (which reads the exported bundle's
``configs/inference.yaml``: ``network_def``, ``preprocessing``, ``inferer``, ``postprocessing``, ``device``) with
what annotators need beside the mask:

- ``num_generations`` per request (the ensemble size N; the bundle's value, the few-step cDAL default of 5, when
  the request does not say), validated;
- ``whole_slices`` per request for models that infer volumes slice by slice (the 2-D Hippocampus models): true
  sends each slice whole through the network instead of the paper's overlapping windows, the fast protocol (about
  4.5x faster; the same mean Dice on the 52 held-out volumes of fold 0, docs/benchmarks.md); the bundle's value
  when the request does not say; the result JSON says which protocol made the label;
- the uncertainty map (per-pixel standard deviation of the generations) written next to the label: a float32
  TIFF for 2-D tiles, a float32 NIfTI in the input's voxel grid for volumes; the app stores it in the datastore
  under the label tag ``uncertainty`` (see ``main.py``) and the result JSON carries its summary;
- the label written as an 8-bit PNG (2-D; 0 background, 1 foreground) or, for volumes, in the input's format and
  geometry (a uint8 NIfTI with the input's affine and header; NRRD / MetaImage with its origin, spacing and
  direction) or the request's ``result_extension``, instead of MONAI Label's default ITK writer, which transposes
  2-D arrays; for a DICOM series (``lib/dicom_series.py``) a DICOM SEG object that references the series' instances
  (``pydicom-seg``, MONAI Label's own dependency), one segment per foreground class, or NIfTI when the request asks
  (``result_extension``) or nothing was predicted (a DICOM SEG holds no empty segmentation); the uncertainty of a
  series is a float32 NIfTI in its grid;
- input checks that end in ``MONAILabelException(INVALID_INPUT)`` with the file and the problem named: an image
  that the model's preprocessing cannot read, or one of the wrong dimensionality.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from typing import Any

import numpy as np
import torch
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.tasks.infer.bundle import BundleInferTask

from bundle.metrics.uncertainty import foreground_uncertainty
from bundle.runtime import as_bool

from .request_checks import display_name

logger = logging.getLogger(__name__)

MAX_GENERATIONS = 64
VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
DICOM_SEG = ".dcm"


def _invalid(message: str) -> MONAILabelException:
    return MONAILabelException(MONAILabelError.INVALID_INPUT, message)


def _array(value: Any) -> np.ndarray:
    if torch.is_tensor(value):
        return value.detach().cpu().float().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    return np.asarray(value)


def _temp_file(suffix: str) -> str:
    """A new path in the temp folder (not created: the writers refuse to replace files)."""
    handle, path = tempfile.mkstemp(prefix="diffseg_", suffix=suffix)
    os.close(handle)
    os.remove(path)
    return path


def _without_path(err: Exception, path: Any) -> str:
    """The error's message with a temporary upload path replaced by what the client knows it as."""
    message = str(err)
    if isinstance(path, str) and path and path in message:
        message = message.replace(path, display_name(path))
    return message


def _with_request(inferer: Any, generations: int, whole_slices: bool) -> Any:
    """A shallow copy of the bundle's ``EnsembleInferer`` with the request's ensemble size and protocol (the cached
    one is left alone)."""
    if not hasattr(inferer, "num_generations"):
        raise TypeError(f"{type(inferer).__name__} has no ensemble size to set")
    inferer = copy.copy(inferer)
    inferer.num_generations = generations
    if hasattr(inferer, "whole_slices"):
        inferer.whole_slices = whole_slices
    return inferer


class EnsembleBundleInferTask(BundleInferTask):
    """``BundleInferTask`` plus per-request ensemble size, uncertainty output and input checks (module docstring)."""

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any) -> None:
        super().__init__(path, conf, **kwargs)
        if not self.is_valid():
            return
        self.model_name = os.path.basename(os.path.normpath(path))
        self.default_generations = int(self.bundle_config.get_parsed_content("num_generations"))
        # network calls per generation: the sampler says whether it runs a chain (diffusion) or one pass
        self.sampling_steps = self.bundle_config.get_parsed_content("sampler").sampling_steps
        channels = self.bundle_config.get("image_channels")  # the network's input channels after preprocessing
        self.image_channels = (
            int(self.bundle_config.get_parsed_content("image_channels")) if channels is not None else None
        )
        # the fast protocol applies to volumes inferred slice by slice by a 2-D network
        self.slice_wise = self._parsed("slice_axis") is not None
        self.default_whole_slices = self.slice_wise and as_bool(self._parsed("whole_slices"), "whole_slices")
        self._config.update({"num_generations": self.default_generations, "save_uncertainty": True})
        if self.slice_wise:
            self._config["whole_slices"] = self.default_whole_slices
        steps = f" ({self.sampling_steps} sampling steps each)" if self.sampling_steps else ""
        protocol = (
            f" Request option whole_slices (true: each slice whole, the fast protocol; default "
            f"{str(self.default_whole_slices).lower()})."
            if self.slice_wise
            else ""
        )
        self.description = (
            f"{self.description or ''} Ensemble of {self.default_generations} generations by default"
            f"{steps}; request option num_generations (1-{MAX_GENERATIONS}).{protocol} "
            "The uncertainty map is stored under the label tag 'uncertainty'."
        ).strip()

    def _parsed(self, key: str) -> Any:
        """The bundle config's ``key``, parsed; None where the bundle does not have it."""
        return self.bundle_config.get_parsed_content(key) if self.bundle_config.get(key) is not None else None

    # ----------------------------------------------------------------------------------------------- requests
    def _generations(self, data: dict) -> int:
        value = data.get("num_generations", self.default_generations) if data else self.default_generations
        try:
            generations = int(value)
            if generations != float(value):
                raise ValueError
        except (TypeError, ValueError):
            raise _invalid(f"num_generations must be an integer, got {value!r}") from None
        if not 1 <= generations <= MAX_GENERATIONS:
            raise _invalid(f"num_generations must be between 1 and {MAX_GENERATIONS}, got {generations}")
        return generations

    def _whole_slices(self, data: dict) -> bool:
        value = data.get("whole_slices") if data else None
        if value is None:
            return self.default_whole_slices
        try:
            whole = as_bool(value, "whole_slices")
        except ValueError as err:
            raise _invalid(str(err)) from None
        if whole and not self.slice_wise:
            raise _invalid(
                f"whole_slices applies to volumes inferred slice by slice; model '{self.model_name}' infers "
                f"{'3-D windows' if self.dimension == 3 else '2-D images'}"
            )
        return whole

    def inferer(self, data=None):
        data = data or {}
        return _with_request(super().inferer(data), self._generations(data), self._whole_slices(data))

    def run_pre_transforms(self, data: dict[str, Any], transforms):
        from bundle.data.checks import content_problem

        image = data.get("image_path") or data.get("image")
        name = display_name(image) if isinstance(image, str) else "the image"
        try:
            data = super().run_pre_transforms(data, transforms)
        except MONAILabelException:
            raise
        except Exception as err:  # noqa: BLE001 - the reader's own error, with the image and the model named
            raise _invalid(
                f"model '{self.model_name}' cannot read {name} as a {self.dimension}-D image: "
                f"{type(err).__name__}: {_without_path(err, image)}"
            ) from err
        loaded = data.get(self.input_key)
        if loaded is None or not hasattr(loaded, "ndim"):
            raise _invalid(f"model '{self.model_name}': no image was loaded from {name}")
        problem = content_problem(loaded, self.image_channels, self.dimension)
        if problem is not None:
            raise _invalid(f"model '{self.model_name}': {name} {problem}")
        return data

    # ------------------------------------------------------------------------------------------------ outputs
    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        pred = _array(data[self.output_label_key])
        if pred.ndim == self.dimension + 1:
            pred = pred[0]
        if pred.ndim != self.dimension:
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR, f"label of shape {pred.shape} for a {self.dimension}-D model"
            )
        label = np.rint(pred).astype(np.uint8)
        result: dict[str, Any] = {
            "num_generations": self._generations(data),
            "sampling_steps": self.sampling_steps,
            "whole_slices": self._whole_slices(data),
            "label_values": sorted(int(v) for v in np.unique(label)),
        }
        if self.dimension == 2:
            from PIL import Image

            label_file = _temp_file(".png")
            Image.fromarray(label).save(label_file)
        else:
            extension = self._volume_extension(data)
            if extension == DICOM_SEG:  # a DICOM series: its label as a DICOM SEG, its uncertainty as NIfTI
                extension = ".nii.gz"
                volume = self._save_volume(label, data, _temp_file(extension), np.uint8)
                if label.any():
                    label_file = self._dicom_seg(volume, data["image_path"])
                    os.remove(volume)
                else:
                    label_file = volume
                    result["label_note"] = "nothing was predicted; a DICOM SEG holds no empty segmentation: NIfTI"
            else:
                label_file = self._save_volume(label, data, _temp_file(extension), np.uint8)
        uncertainty = data.get("uncertainty")
        if uncertainty is not None and str(data.get("save_uncertainty", True)).lower() != "false":
            u = _array(uncertainty).astype(np.float32)
            if u.ndim == self.dimension + 1:
                u = u[0]
            if self.dimension == 2:
                from PIL import Image

                u_file = _temp_file(".tif")
                Image.fromarray(u, mode="F").save(u_file)
            else:  # the label's format (NIfTI beside a DICOM SEG)
                u_file = self._save_volume(u, data, _temp_file(extension), np.float32)
            result["uncertainty"] = {
                "file": u_file,
                "mean": float(u.mean()),
                "max": float(u.max()),
                "fraction_above_0.1": float((u > 0.1).mean()),
                "foreground_fraction": float((label > 0).mean()),
                "score": foreground_uncertainty(u, label),
                "definition": "standard deviation of the generations' foreground probabilities per pixel",
            }
        return label_file, result

    @staticmethod
    def _volume_extension(data: dict[str, Any]) -> str:
        """The request's ``result_extension`` (MONAI Label's option) or the input's own format: NIfTI, NRRD or
        MetaImage (``bundle.transforms.writers.label_extension``)."""
        from bundle.transforms.writers import label_extension

        image = data.get("image_path") or ""
        series = os.path.isdir(image)
        allowed = (*VOLUME_EXTENSIONS, DICOM_SEG) if series else VOLUME_EXTENSIONS
        asked = data.get("result_extension")
        if asked:
            asked = asked if asked.startswith(".") else f".{asked}"
            if asked not in allowed:
                raise _invalid(f"result_extension {asked!r}: this volume's label is written as one of {list(allowed)}")
            return asked
        return DICOM_SEG if series else label_extension(image)

    def _dicom_seg(self, volume: str, series: str) -> str:
        """The uint8 label ``volume`` (NIfTI in the series' grid) as a DICOM SEG of the series in folder ``series``:
        one segment per foreground class (the bundle's ``class_names``), referencing every source instance."""
        import pydicom
        import pydicom_seg
        import SimpleITK

        names = self.bundle_config.get("class_names") or ["foreground"]
        names = list(self.bundle_config.get_parsed_content("class_names")) if isinstance(names, str) else list(names)
        segments = [
            {
                "labelID": value,
                "SegmentLabel": name,
                "SegmentDescription": f"{name} ({self.model_name})",
                "SegmentAlgorithmType": "AUTOMATIC",
                "SegmentAlgorithmName": self.model_name,
                "SegmentedPropertyCategoryCodeSequence": {
                    "CodeValue": "123037004",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Anatomical Structure",
                },
                # no standard code is claimed for a model's class: a local coding scheme ("99" prefix) names it
                "SegmentedPropertyTypeCodeSequence": {
                    "CodeValue": f"DIFFSEG{value}",
                    "CodingSchemeDesignator": "99DIFFSEG",
                    "CodeMeaning": name,
                },
            }
            for value, name in enumerate(names, start=1)
        ]
        template = pydicom_seg.template.from_dcmqi_metainfo(
            {
                "ContentCreatorName": "diffseg",
                "SeriesDescription": f"{self.model_name} segmentation",
                "ContentDescription": "diffusion ensemble segmentation (MONAI Label)",
                "segmentAttributes": [segments],
            }
        )
        sources = sorted(os.path.join(series, f) for f in os.listdir(series))
        datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in sources]
        mask = SimpleITK.Cast(SimpleITK.ReadImage(volume), SimpleITK.sitkUInt16)
        writer = pydicom_seg.MultiClassWriter(template=template, inplane_cropping=False, skip_empty_slices=False)
        path = _temp_file(DICOM_SEG)
        writer.write(mask, datasets).save_as(path)
        return path

    def _save_volume(self, array: np.ndarray, data: dict[str, Any], path: str, dtype) -> str:
        """A volume in the input's voxel grid with its affine and header (the postprocessing inverted the
        reorientation; ``save_label_volume`` checks that the grids agree)."""
        from bundle.transforms.writers import reference_grid, save_label_volume

        reference = data.get("image_path")
        affine = getattr(data.get(self.output_label_key), "affine", None)
        if affine is None:
            affine = reference_grid(reference)[1]
        return str(save_label_volume(array, _array(affine), reference, path, dtype=dtype))
