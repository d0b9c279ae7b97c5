"""Check every input before computing: all bad files reported at once, then stop or skip them.

``checked_datalist`` runs each item of an inference datalist through the workflow's own preprocessing (the reader,
reorientation, scaling: whatever the config composes) and checks what comes out (dimensionality, channels, finite
values) before the first network call. ``on_bad_input``:

- ``"stop"``: nothing is computed; one ``DataFormatError`` names every bad file and its problem (the last line the
  user reads, bundle/data/errors.py);
- ``"skip"``: the good files are processed; ``<report_dir>/skipped_inputs.csv`` lists each skipped file and why, and
  a warning says how many were skipped.

Training and validation get the same checks in the pass that fills their cache (``CheckedCacheDataset``: every
image and label is read there anyway), and evaluation over a split before its first volume (``checked_items``); both
name every bad file at once and stop before computing.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset

from bundle.data.errors import DataFormatError, OutputError, error_chain, find_input_error, one_line
from bundle.files import atomic_output

__all__ = [
    "ON_BAD_INPUT",
    "SKIP_REPORT",
    "CheckedCacheDataset",
    "bad_input_error",
    "checked_datalist",
    "check_writable",
    "checked_items",
    "content_problem",
    "failure_problem",
    "input_problem",
    "item_problem",
    "warn_if_resized",
]

ON_BAD_INPUT = ("stop", "skip")
SKIP_REPORT = "skipped_inputs.csv"
logger = logging.getLogger(__name__)


def _innermost(error: BaseException) -> BaseException:
    *_, last = error_chain(error)
    return last


def _nifti_problem(path: str) -> str | None:
    """Why a ``.nii`` / ``.nii.gz`` file is not a readable NIfTI volume (header and all voxels), or None.

    MONAI's ``LoadImage`` tries every other reader after the named one fails and reports the last one's complaint
    (a NumPy pickle warning for a truncated ``.nii.gz``); this reads the file with nibabel alone first.
    """
    import nibabel as nib
    import numpy as np

    try:
        np.asanyarray(nib.load(path).dataobj)
    except Exception as err:  # noqa: BLE001 - any failure of nibabel on the file is the file's problem
        lines = str(err).strip().splitlines()
        return f"not a readable NIfTI volume ({type(err).__name__}: {lines[-1] if lines else 'no message'})"
    return None


PROBES = {(".nii", ".nii.gz"): _nifti_problem}


def failure_problem(err: BaseException, path: str) -> tuple[str, str]:
    """``(file, problem)`` for a reader or transform failure on the item whose image is ``path``: the file the error
    names (an image or its label), else ``path``; the problem in one line."""
    for suffixes, probe in PROBES.items():  # the format's own reader says why, rather than MONAI's last one
        if path.lower().endswith(suffixes) and os.path.isfile(path):
            problem = probe(path)
            if problem is not None:
                return path, problem
    named = find_input_error(err)
    if named is not None:
        named_path = getattr(named, "path", None)
        text = one_line(named)
        if named_path is not None and text.startswith(named_path + ": "):
            return named_path, text[len(named_path) + 2 :]
        return path, (text[len(path) + 2 :] if text.startswith(path + ": ") else text)
    inner = _innermost(err)
    lines = str(inner).strip().splitlines()
    message = lines[-1] if lines else "no message"
    message = message if len(message) <= 160 else message[:157] + "..."
    return path, f"unreadable ({type(inner).__name__}: {message})"


def content_problem(image: Any, image_channels: int | None = None, spatial_ndim: int | None = None) -> str | None:
    """Why a loaded, channel-first image cannot go through the model (dimensionality, channels, non-finite values)."""
    image = torch.as_tensor(image)
    if spatial_ndim is not None and image.ndim != spatial_ndim + 1:
        return (
            f"has {image.ndim - 1} spatial dimensions after loading (shape {tuple(image.shape)}, channel first); "
            f"this model takes {spatial_ndim}-D images"
        )
    if image_channels is not None and image.shape[0] != image_channels:
        return f"has {image.shape[0]} channels after loading (shape {tuple(image.shape)}); this model takes {image_channels}"
    if image.is_floating_point() and not bool(torch.isfinite(image).all()):
        return f"holds {int((~torch.isfinite(image)).sum())} non-finite (NaN or inf) values"
    return None


def item_problem(
    item: dict[str, Any],
    preprocessing: Callable[[dict], dict],
    image_channels: int | None = None,
    spatial_ndim: int | None = None,
    key: str = "image",
) -> tuple[str, str] | None:
    """``(file, problem)`` when ``item`` cannot go through the model (the file: the one the error names, else the
    item's image), or None when it can (then an input far from the model's size gets ``warn_if_resized``)."""
    path = str(item[key])
    try:
        image = preprocessing(dict(item))[key]
    except Exception as err:  # noqa: BLE001 - every failure of a reader or transform is a reason to report
        return failure_problem(err, path)
    problem = content_problem(image, image_channels, spatial_ndim)
    if problem is not None:
        return path, problem
    warn_if_resized(path, image)
    return None


def input_problem(
    item: dict[str, Any],
    preprocessing: Callable[[dict], dict],
    image_channels: int | None = None,
    spatial_ndim: int | None = None,
    key: str = "image",
) -> str | None:
    """Why ``item`` cannot be inferred (one line, without the item's own file name), or None when it can."""
    found = item_problem(item, preprocessing, image_channels, spatial_ndim, key)
    if found is None:
        return None
    named, problem = found
    return problem if named == str(item[key]) else f"{named}: {problem}"


#: resize factors (either way) beyond which an input is far from the size the model works at
RESIZE_WARNING_FACTOR = 4.0


def warn_if_resized(path: str, image: Any, limit: float = RESIZE_WARNING_FACTOR) -> float | None:
    """Warn when preprocessing resized ``path`` by more than ``limit`` along an axis (a 12000 x 12000 slide or a
    1 x 1 image for a 256 x 256 model): the model sees it at a scale it was not trained for. Returns the largest
    factor (>1: shrunk, <1: enlarged) or None when the image's metadata do not hold its original size."""
    meta = getattr(image, "meta", None) or {}
    original = meta.get("spatial_shape")
    if original is None:
        return None
    original = [int(v) for v in torch.as_tensor(original).reshape(-1).tolist()]
    now = list(torch.as_tensor(image).shape[1:])
    if len(original) != len(now) or min(original) < 1:
        return None
    factors = [o / n for o, n in zip(original, now)]
    worst = max(factors, key=lambda f: max(f, 1.0 / f))
    if max(worst, 1.0 / worst) > limit:
        size = " x ".join(str(v) for v in original)
        target = " x ".join(str(v) for v in now)
        change = f"shrunk {worst:.1f}x" if worst > 1 else f"enlarged {1.0 / worst:.1f}x"
        logger.warning(
            f"{path}: {size} pixels, {change} to the model's {target}: far from the scale it was trained at; "
            "expect poorer masks (tile large images, or resample to the training resolution)"
        )
    return worst


def bad_input_error(bad: Sequence[tuple[str, str]], total: int, what: str, advice: str) -> DataFormatError:
    """One error naming every ``(file, problem)`` of ``bad`` (of ``total`` items): the file itself when there is
    one, else the folder of the first, with every file and problem listed; ``advice`` is appended."""
    first = bad[0][0]
    if len(bad) == 1:
        return DataFormatError(first, f"{bad[0][1]}{advice}")
    listing = "; ".join(f"{path}: {problem}" for path, problem in bad)
    return DataFormatError(Path(first).parent, f"{len(bad)} of {total} {what}: {listing}{advice}")


def checked_items(
    datalist: Sequence[dict[str, Any]],
    preprocessing: Callable[[dict], dict],
    role: str = "evaluation",
    image_channels: int | None = None,
    spatial_ndim: int | None = None,
    key: str = "image",
) -> list[dict[str, Any]]:
    """``datalist`` when every item goes through ``preprocessing`` into a usable image (``content_problem``), else
    one ``DataFormatError`` naming every bad file (images and labels) before anything is computed."""
    found = (item_problem(item, preprocessing, image_channels, spatial_ndim, key) for item in datalist)
    bad = [problem for problem in found if problem is not None]
    if bad:
        raise bad_input_error(
            bad,
            len(datalist),
            f"{role} items are unusable",
            f" (checked before computing; fix or remove them from the {role} list)",
        )
    return list(datalist)


class CheckedCacheDataset(CacheDataset):
    """MONAI's ``CacheDataset`` whose caching pass is the input check of training and validation.

    Every item goes through the deterministic transforms once, as ``CacheDataset`` does anyway; a failure (the
    reader, a label check, a transform) or an unusable result (``content_problem``: dimensionality, channels,
    non-finite values) is recorded instead of stopping at the first, and after the pass one ``DataFormatError``
    names every bad file and its problem, before the first iteration. ``role`` says which list it is (training,
    validation) in that message.
    """

    def __init__(
        self,
        data: Sequence[dict[str, Any]],
        transform: Callable | Sequence[Callable] | None = None,
        *args: Any,
        role: str = "training",
        image_channels: int | None = None,
        spatial_ndim: int | None = None,
        key: str = "image",
        **kwargs: Any,
    ) -> None:
        self.role, self.image_channels, self.spatial_ndim, self.key = role, image_channels, spatial_ndim, key
        self._problems: list[tuple[int, str, str]] = []
        super().__init__(data, transform, *args, **kwargs)

    def _fill_cache(self, indices: Sequence[int] | None = None) -> list:
        self._problems = []
        cache = super()._fill_cache(indices)
        if self._problems:
            bad = [(path, problem) for _, path, problem in sorted(self._problems)]
            raise bad_input_error(
                bad,
                len(self.data),
                f"{self.role} items are unusable",
                f" (checked before the first iteration; fix or remove them from the {self.role} list)",
            )
        return cache

    def _load_cache_item(self, idx: int) -> Any:
        item = self.data[idx]
        path = str(item.get(self.key, f"{self.role} item {idx}")) if isinstance(item, Mapping) else f"item {idx}"
        try:
            loaded = super()._load_cache_item(idx)
        except Exception as err:  # noqa: BLE001 - every failure of a reader or transform is a reason to report
            self._problems.append((idx, *failure_problem(err, path)))
            return None
        samples = loaded if isinstance(loaded, list) else [loaded]
        for sample in samples:
            if isinstance(sample, Mapping) and self.key in sample:
                problem = content_problem(sample[self.key], self.image_channels, self.spatial_ndim)
                if problem is not None:
                    self._problems.append((idx, path, problem))
                    return None
        return loaded


def checked_datalist(
    datalist: Sequence[dict[str, Any]],
    preprocessing: Callable[[dict], dict],
    on_bad_input: str = "stop",
    report_dir: str | os.PathLike | None = None,
    image_channels: int | None = None,
    spatial_ndim: int | None = None,
    key: str = "image",
) -> list[dict[str, Any]]:
    """The items of ``datalist`` that can be inferred (module docstring)."""
    if on_bad_input not in ON_BAD_INPUT:
        raise ValueError(f"on_bad_input must be one of {ON_BAD_INPUT}, got {on_bad_input!r}")
    good, bad = [], []
    for item in datalist:
        problem = input_problem(item, preprocessing, image_channels, spatial_ndim, key)
        (good if problem is None else bad).append(item if problem is None else (str(item[key]), problem))
    if not bad:
        return list(good)
    if on_bad_input == "stop" or not good:
        nothing = " (none of the inputs is usable)" if on_bad_input == "skip" else ""
        stop = "; nothing was computed (--on_bad_input skip processes the others)" * (on_bad_input == "stop")
        raise bad_input_error(bad, len(datalist), "inputs cannot be inferred", nothing + stop)
    if report_dir is not None:
        report = Path(report_dir) / SKIP_REPORT
        with atomic_output(report) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "problem"])
            writer.writerows(bad)
        where = f"; listed in {report}"
    else:
        where = ""
    logger.warning("skipping %d of %d inputs that cannot be inferred%s", len(bad), len(datalist), where)
    return list(good)


def check_writable(folders: Sequence[str | os.PathLike], min_free_mb: float = 200.0) -> None:
    """Before a workflow computes anything: every output folder exists (created if needed) and takes a file; a
    folder that does not raises ``OutputError`` naming it (the last line the user reads), and a folder on a file
    system with less than ``min_free_mb`` free gets a warning with the free space."""
    import shutil
    import tempfile

    for folder in folders:
        if folder is None:
            continue
        folder = os.fspath(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_check_"):
                pass
        except OSError as err:
            raise OutputError(
                folder, f"output folder cannot be written ({err.strerror or err}); nothing was computed"
            ) from err
        free_mb = shutil.disk_usage(folder).free / 2**20
        if free_mb < min_free_mb:
            logger.warning(f"{folder}: only {free_mb:.0f} MB free on its file system; outputs may not fit")
