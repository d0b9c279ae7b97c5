"""Check every input before computing: all bad files reported at once, then stop or skip them.

``checked_datalist`` runs each item of an inference datalist through the workflow's own preprocessing (the reader,
reorientation, scaling: whatever the config composes) and checks what comes out (dimensionality, channels, finite
values) before the first network call. ``on_bad_input``:

- ``"stop"``: nothing is computed; one ``DataFormatError`` names every bad file and its problem (the last line the
  user reads, bundle/data/errors.py);
- ``"skip"``: the good files are processed; ``<report_dir>/skipped_inputs.csv`` lists each skipped file and why, and
  a warning says how many were skipped.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bundle.data.errors import DataFormatError, find_input_error, one_line

__all__ = ["ON_BAD_INPUT", "SKIP_REPORT", "checked_datalist", "input_problem"]

ON_BAD_INPUT = ("stop", "skip")
SKIP_REPORT = "skipped_inputs.csv"
logger = logging.getLogger(__name__)


def _innermost(error: BaseException) -> BaseException:
    seen: set[int] = set()
    while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return error


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


def input_problem(
    item: dict[str, Any],
    preprocessing: Callable[[dict], dict],
    image_channels: int | None = None,
    spatial_ndim: int | None = None,
    key: str = "image",
) -> str | None:
    """Why ``item`` cannot be inferred (one line, without the file name), or None when it can."""
    path = str(item[key])
    try:
        image = preprocessing(dict(item))[key]
    except Exception as err:  # noqa: BLE001 - every failure of a reader or transform is a reason to report
        for suffixes, probe in PROBES.items():  # the format's own reader says why, rather than MONAI's last one
            if path.lower().endswith(suffixes) and os.path.isfile(path):
                problem = probe(path)
                if problem is not None:
                    return problem
        named = find_input_error(err)
        if named is not None:
            text = one_line(named)
            return text[len(path) + 2 :] if text.startswith(path + ": ") else text
        inner = _innermost(err)
        lines = str(inner).strip().splitlines()
        message = lines[-1] if lines else "no message"
        message = message if len(message) <= 160 else message[:157] + "..."
        return f"unreadable ({type(inner).__name__}: {message})"
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
        listing = "; ".join(f"{path}: {problem}" for path, problem in bad)
        first = bad[0][0]
        nothing = " (none of the inputs is usable)" if on_bad_input == "skip" else ""
        raise DataFormatError(
            first if len(bad) == 1 else Path(first).parent,
            (bad[0][1] if len(bad) == 1 else f"{len(bad)} of {len(datalist)} inputs cannot be inferred: {listing}")
            + nothing
            + "; nothing was computed (--on_bad_input skip processes the others)" * (on_bad_input == "stop"),
        )
    if report_dir is not None:
        report = Path(report_dir) / SKIP_REPORT
        report.parent.mkdir(parents=True, exist_ok=True)
        with open(report, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "problem"])
            writer.writerows(bad)
        where = f"; listed in {report}"
    else:
        where = ""
    logger.warning("skipping %d of %d inputs that cannot be inferred%s", len(bad), len(datalist), where)
    return list(good)
