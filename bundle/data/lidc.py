"""LIDC-IDRI lesion crops with several annotators -> datalists split by patient; readers of both on-disk layouts.

Accepted layouts:

- **crop layout** (the layout of ``../shared/data/lidc`` used by ambiguous-segmentation work)::

      root/training/<id>/image_<n>.jpg  label0_.jpg  label1_.jpg  label2_.jpg  label3_.jpg
      root/testing/<id>/...             (optionally root/validation/<id>/...)

  128x128 grey JPEG; the masks carry JPEG noise and are thresholded at 127 (> 127 is foreground). The folders carry
  no patient ids, so every case folder is its own group.
- **pickle layout** (Knegt's ``data_lidc.pickle``, also MoSE's input): one pickle holding a dict keyed by slice name;
  each value has ``"image"`` (128x128 float) and ``"masks"`` (a list of 4 binary 128x128 arrays) and, in the
  original file, ``"series_uid"``. The patient (group) of a slice is its ``series_uid`` when present, else the part of
  the key before a ``_slice``/``-slice`` suffix, else the whole key. ``root`` is the pickle file or a folder holding
  exactly one ``*.pickle``/``*.pkl``. The pickle is read with an unpickler that only admits numpy arrays and plain
  containers (no code runs from the file).

Datalist entries: ``{"image": ref, "label": [ref, ...] (one per annotator), "patient": id, "name": case,
"subset": ...}``. For the crop layout a ref is a file path; for the pickle layout it is ``"<pickle path>::<key>"``
(image) and ``"<pickle path>::<key>::<k>"`` (mask k). ``bundle.transforms.annotators.LoadLIDCd`` reads both.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from bundle.data.errors import DataFormatError
from bundle.data.monuseg import _write_json

__all__ = [
    "LIDC_MASK_THRESHOLD",
    "find_lidc_cases",
    "read_lidc_pickle",
    "read_lidc_pickle_entry",
    "lidc_patient_id",
    "split_by_patient",
    "build_lidc_datalist",
    "PICKLE_REF_SEPARATOR",
]

#: JPEG masks: grey value > 127 is foreground
LIDC_MASK_THRESHOLD = 127
PICKLE_REF_SEPARATOR = "::"
PICKLE_SUFFIXES = (".pickle", ".pkl")
_SUBSET_DIRS = {
    "training": "training",
    "train": "training",
    "validation": "validation",
    "val": "validation",
    "testing": "test",
    "test": "test",
}
_IMAGE_RE = re.compile(r"^image.*\.(jpe?g|png)$", re.IGNORECASE)
_LABEL_RE = re.compile(r"^label(\d+)_?.*\.(jpe?g|png)$", re.IGNORECASE)
_SLICE_RE = re.compile(r"^(?P<patient>.+?)[_-]slice[_-]?\d*.*$", re.IGNORECASE)


def _case_files(case: Path) -> dict[str, Any]:
    """The image and the ordered annotator masks of one case folder."""
    images = [p for p in sorted(case.iterdir()) if p.is_file() and _IMAGE_RE.match(p.name)]
    labels = {}
    for p in sorted(case.iterdir()):
        match = _LABEL_RE.match(p.name) if p.is_file() else None
        if match:
            index = int(match.group(1))
            if index in labels:
                raise DataFormatError(p, f"second mask for annotator {index} (also {labels[index].name})")
            labels[index] = p
    if len(images) != 1:
        found = ", ".join(p.name for p in images) or "none"
        raise DataFormatError(case, f"expected exactly one image_*.jpg in the case folder, found {found}")
    if not labels:
        raise DataFormatError(case, "no annotator masks (label0_.jpg, label1_.jpg, ...) in the case folder")
    if sorted(labels) != list(range(len(labels))):
        raise DataFormatError(case, f"annotator masks must be numbered 0..{len(labels) - 1}, found {sorted(labels)}")
    return {"image": str(images[0]), "label": [str(labels[i]) for i in range(len(labels))]}


def _case_sort_key(path: Path) -> tuple[int, int | str]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def find_lidc_cases(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Cases of the crop layout under ``root`` (folders ``training``/``testing``/``validation`` of case folders).

    Returns:
        dicts with ``image`` (path), ``label`` (list of mask paths, annotator order), ``patient`` and ``name`` (the
        case folder name) and ``subset`` (``training``, ``validation`` or ``test``), sorted by subset then case.

    Raises:
        DataFormatError: no subset folder, a case folder without exactly one image or without masks, or cases with
            different numbers of annotators.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DataFormatError(root, "LIDC folder does not exist or is not a directory")
    cases = []
    for dirname, subset in _SUBSET_DIRS.items():
        folder = root / dirname
        if not folder.is_dir():
            continue
        for case in sorted(
            (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_case_sort_key
        ):
            files = _case_files(case)
            cases.append({**files, "patient": case.name, "name": case.name, "subset": subset})
    if not cases:
        raise DataFormatError(
            root,
            "no LIDC cases found: expected training/<id>/ and testing/<id>/ folders with image_*.jpg and "
            "label0_.jpg .. label3_.jpg, or a data_lidc.pickle",
        )
    counts = {len(c["label"]) for c in cases}
    if len(counts) > 1:
        odd = next(c for c in cases if len(c["label"]) != len(cases[0]["label"]))
        raise DataFormatError(
            Path(odd["image"]).parent,
            f"has {len(odd['label'])} annotator masks but {cases[0]['name']} has {len(cases[0]['label'])}; "
            "all cases need the same number of annotators",
        )
    order = {"training": 0, "validation": 1, "test": 2}
    return sorted(cases, key=lambda c: (order[c["subset"]], _case_sort_key(Path(c["name"]))))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that admits only numpy arrays/scalars and plain containers."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and containers are read")


@functools.lru_cache(maxsize=1)
def _load_pickle(path: str, mtime_ns: int) -> dict:
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as err:
        raise DataFormatError(path, f"unreadable LIDC pickle ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not data:
        raise DataFormatError(path, f"expected a non-empty dict keyed by slice name, got {type(data).__name__}")
    return data


def read_lidc_pickle(path: str | os.PathLike) -> dict:
    """The dict of a LIDC pickle (cached: the last file read stays in memory)."""
    path = os.fspath(Path(path).expanduser().absolute())
    if not os.path.isfile(path):
        raise DataFormatError(path, "LIDC pickle does not exist")
    return _load_pickle(path, os.stat(path).st_mtime_ns)


def read_lidc_pickle_entry(path: str | os.PathLike, key: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """(image (H, W) float32, masks [(H, W) uint8 in {0, 1}, ...]) of one slice, checked."""
    data = read_lidc_pickle(path)
    where = f"{os.fspath(path)}{PICKLE_REF_SEPARATOR}{key}"
    if key not in data:
        raise DataFormatError(where, "slice key not found in the pickle")
    entry = data[key]
    if not isinstance(entry, dict) or "image" not in entry or "masks" not in entry:
        raise DataFormatError(where, "entry must be a dict with 'image' and 'masks'")
    image = np.asarray(entry["image"], dtype=np.float32)
    if image.ndim != 2:
        raise DataFormatError(where, f"image must be 2-D, got shape {image.shape}")
    masks = []
    for k, mask in enumerate(entry["masks"]):
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise DataFormatError(where, f"mask {k} has shape {mask.shape}, the image {image.shape}")
        values = set(np.unique(mask).tolist())
        if not values <= {0, 1} and not values <= {0, 255}:
            shown = sorted(values)[:8]
            raise DataFormatError(where, f"mask {k} must be binary ({{0, 1}} or {{0, 255}}), found values {shown}")
        masks.append((mask > 0).astype(np.uint8))
    if not masks:
        raise DataFormatError(where, "entry has no masks")
    return image, masks


def lidc_patient_id(key: str, entry: Any = None) -> str:
    """Patient (group) of a pickle slice: ``series_uid`` if present, else the key before ``_slice...``, else the key."""
    if isinstance(entry, dict) and entry.get("series_uid") is not None:
        return str(entry["series_uid"])
    match = _SLICE_RE.match(key)
    return match.group("patient") if match else key


def _pickle_cases(path: Path) -> list[dict[str, Any]]:
    data = read_lidc_pickle(path)
    cases = []
    for key in sorted(data, key=str):
        _, masks = read_lidc_pickle_entry(path, key)
        ref = f"{path}{PICKLE_REF_SEPARATOR}{key}"
        cases.append(
            {
                "image": ref,
                "label": [f"{ref}{PICKLE_REF_SEPARATOR}{k}" for k in range(len(masks))],
                "patient": lidc_patient_id(str(key), data[key]),
                "name": str(key),
                "subset": "all",
            }
        )
    counts = {len(c["label"]) for c in cases}
    if len(counts) > 1:
        raise DataFormatError(path, f"slices have different numbers of masks: {sorted(counts)}")
    return cases


def _find_pickle(root: Path) -> Path | None:
    if root.is_file() and root.suffix.lower() in PICKLE_SUFFIXES:
        return root
    if root.is_dir() and not any((root / d).is_dir() for d in _SUBSET_DIRS):
        found = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
        if len(found) > 1:
            raise DataFormatError(root, f"several LIDC pickles ({', '.join(p.name for p in found)}); pass one file")
        return found[0] if found else None
    return None


def split_by_patient(patients: list[str], fraction: float, seed: int) -> set[str]:
    """The patients held out: ``round(fraction * n)`` (at least 1 when fraction > 0, at most n - 1) of the sorted
    unique ids, chosen by ``numpy.random.default_rng(seed).permutation``."""
    unique = sorted(set(patients))
    n = len(unique)
    if fraction <= 0 or n < 2:
        return set()
    count = min(n - 1, max(1, int(round(fraction * n))))
    order = np.random.default_rng(seed).permutation(n)
    return {unique[int(i)] for i in order[:count]}


def build_lidc_datalist(
    root: str | os.PathLike,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    output_json: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Datalist ``{"training", "validation", "test"}`` of a LIDC folder or pickle, split by patient.

    Crop layout: ``testing/`` is the test set; ``validation/`` (if present) the validation set, otherwise
    ``val_fraction`` of the training patients are moved to validation. Pickle layout: ``test_fraction`` of the
    patients go to test, then ``val_fraction`` of the remaining patients to validation (MoSE: 0.2 and 0.2). No
    patient is in two subsets. The split is deterministic in ``seed``.

    Args:
        root: crop-layout folder, a pickle file, or a folder holding one pickle.
        val_fraction: share of (training) patients for validation, in [0, 1).
        test_fraction: share of patients for test (pickle layout only), in [0, 1).
        seed: seed of the patient permutations.
        output_json: write the datalist there (an existing different file is replaced only with ``overwrite``).
        overwrite: allow replacing a different ``output_json``.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    root_path = Path(root).expanduser().absolute()
    pickle_path = _find_pickle(root_path)
    if pickle_path is not None:
        cases = _pickle_cases(pickle_path)
        test_patients = split_by_patient([c["patient"] for c in cases], test_fraction, seed)
        rest = [c["patient"] for c in cases if c["patient"] not in test_patients]
        val_patients = split_by_patient(rest, val_fraction, seed + 1)
        for case in cases:
            patient = case["patient"]
            case["subset"] = (
                "test" if patient in test_patients else "validation" if patient in val_patients else ("training")
            )
    else:
        cases = find_lidc_cases(root_path)
        if not any(c["subset"] == "validation" for c in cases):
            train_patients = [c["patient"] for c in cases if c["subset"] == "training"]
            val_patients = split_by_patient(train_patients, val_fraction, seed)
            for case in cases:
                if case["subset"] == "training" and case["patient"] in val_patients:
                    case["subset"] = "validation"
    datalist = {s: [c for c in cases if c["subset"] == s] for s in ("training", "validation", "test")}
    if not datalist["training"]:
        raise DataFormatError(root_path, "no LIDC training cases after the split")
    if output_json is not None:
        _write_json(Path(output_json).expanduser().absolute(), datalist, overwrite)
    return datalist
