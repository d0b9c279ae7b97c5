"""Medical Segmentation Decathlon Task04 (Hippocampus) in its original layout -> pairs -> fold datalists.

Accepted layouts under ``root`` (the ``Task04_Hippocampus`` folder):

- ``dataset.json`` (MSD format) whose ``"training"`` entries name ``./imagesTr/<case>.nii.gz`` and
  ``./labelsTr/<case>.nii.gz`` relative to ``root``; its ``"labels"`` give the class names;
- without ``dataset.json``: ``imagesTr/*.nii.gz`` paired with ``labelsTr/`` files of the same name (macOS
  ``._*`` side files, which the MSD tarballs contain, are ignored); classes 0 background, 1 anterior,
  2 posterior.

Folds: 4 unshuffled partitions of the ``dataset.json`` order (case i -> fold i % 4, MONAI's
``partition_dataset``), as the cDAL reference; fold k is held out as ``test``, a seeded share of the rest
selects the model (see ``bundle.data.folds``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from bundle.data.errors import DataFormatError
from bundle.data.folds import fold_datalist, write_datalist_json

__all__ = [
    "DEFAULT_CLASSES",
    "read_msd_classes",
    "find_msd_pairs",
    "build_hippocampus_datalist",
    "write_synthetic_hippocampus",
]

DEFAULT_CLASSES = {0: "background", 1: "anterior", 2: "posterior"}
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _load_dataset_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataFormatError(path, f"not readable as JSON ({err})") from None
    if not isinstance(content, dict):
        raise DataFormatError(path, "must hold a JSON object")
    return content


def read_msd_classes(root: str | os.PathLike) -> dict[int, str]:
    """``{label value: class name}`` from ``root/dataset.json`` (lower-case names), else :data:`DEFAULT_CLASSES`."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return dict(DEFAULT_CLASSES)
    labels = _load_dataset_json(path).get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DataFormatError(path, "has no 'labels' object mapping label values to class names")
    try:
        classes = {int(value): str(name).strip().lower() for value, name in labels.items()}
    except ValueError:
        raise DataFormatError(path, f"'labels' keys must be integer label values, got {list(labels)}") from None
    if sorted(classes) != list(range(len(classes))):
        raise DataFormatError(path, f"'labels' values must be 0..C-1, got {sorted(classes)}")
    return classes


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _pairs_from_json(root: Path, path: Path) -> list[dict[str, str]]:
    training = _load_dataset_json(path).get("training")
    if not isinstance(training, list) or not training:
        raise DataFormatError(path, "has no non-empty 'training' list")
    pairs = []
    for index, entry in enumerate(training):
        if not isinstance(entry, dict) or not {"image", "label"} <= set(entry):
            raise DataFormatError(path, f"training entry {index} must have 'image' and 'label', got {entry!r}")
        image, label = (root / str(entry["image"])).absolute(), (root / str(entry["label"])).absolute()
        for kind, file in (("image", image), ("label", label)):
            if not file.is_file():
                raise DataFormatError(file, f"missing: listed as the {kind} of training entry {index} in {path}")
        pairs.append({"image": os.path.normpath(image), "label": os.path.normpath(label), "name": _case_name(image)})
    return pairs


def _pairs_from_folders(root: Path) -> list[dict[str, str]]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise DataFormatError(root, "no MSD layout: expected dataset.json, or imagesTr/ and labelsTr/")
    images = sorted(
        p
        for p in images_dir.iterdir()
        if p.is_file() and p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith(".")
    )
    if not images:
        raise DataFormatError(images_dir, "holds no .nii.gz / .nii volumes")
    pairs = []
    for image in images:
        label = labels_dir / image.name
        if not label.is_file():
            raise DataFormatError(label, f"missing: the label volume of {image}")
        pairs.append({"image": str(image), "label": str(label), "name": _case_name(image)})
    return pairs


def find_msd_pairs(root: str | os.PathLike) -> list[dict[str, str]]:
    """The labelled cases of an MSD task folder, in ``dataset.json`` order (else sorted by file name).

    Returns:
        dicts ``{"image", "label", "name"}`` with absolute paths.

    Raises:
        DataFormatError: ``root`` missing; unreadable ``dataset.json``; an entry whose file is missing (the
            message names the missing file and the ``dataset.json``); neither ``dataset.json`` nor
            ``imagesTr/`` + ``labelsTr/``; an image without its label; duplicate case names.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DataFormatError(root, "MSD task folder does not exist or is not a directory")
    json_path = root / "dataset.json"
    pairs = _pairs_from_json(root, json_path) if json_path.is_file() else _pairs_from_folders(root)
    names = [p["name"] for p in pairs]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise DataFormatError(json_path if json_path.is_file() else root, f"case {duplicate!r} is listed twice")
    return pairs


def build_hippocampus_datalist(
    root: str | os.PathLike,
    fold: int = 0,
    num_folds: int = 4,
    val_fraction: float = 0.1,
    seed: int = 0,
    output_json: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Training/validation/test lists for one of the ``num_folds`` unshuffled folds (class names included).

    The returned dict also holds ``"classes"`` (``{"0": "background", ...}``) read from ``dataset.json``.
    """
    root = Path(root).expanduser().absolute()
    classes = read_msd_classes(root)
    datalist = fold_datalist(
        find_msd_pairs(root),
        fold,
        num_folds,
        val_fraction,
        seed,
        shuffle_seed=None,
        extra={"dataset": "hippocampus", "classes": {str(k): v for k, v in sorted(classes.items())}},
    )
    if output_json is not None:
        write_datalist_json(output_json, datalist, overwrite)
    return datalist


def write_synthetic_hippocampus(
    root: str | os.PathLike,
    num_cases: int = 8,
    shape: tuple[int, int, int] = (36, 48, 34),
    seed: int = 0,
    with_dataset_json: bool = True,
) -> Path:
    """Write small synthetic volumes in the MSD Task04 layout (for tests and smoke runs).

    Each case: ``imagesTr/hippocampus_XXX.nii.gz`` (float32 MRI-like intensities, every third case uint8 as in
    the real set) and ``labelsTr/hippocampus_XXX.nii.gz`` (uint8; 1 = anterior, 2 = posterior part of a curved
    tube, brighter than its surroundings), RAS affine with a per-case origin, 1 mm voxels; plus ``dataset.json``.
    Sizes vary by up to 3 voxels per axis around ``shape``. Existing files are never replaced.
    """
    import nibabel as nib

    root = Path(root).expanduser().absolute()
    if with_dataset_json and (root / "dataset.json").exists():
        raise DataFormatError(root / "dataset.json", "already exists; refusing to overwrite it")
    rng = np.random.default_rng(seed)
    entries = []
    for case in range(num_cases):
        size = tuple(int(s + rng.integers(-3, 4)) for s in shape)
        x, y, z = np.meshgrid(*(np.arange(s, dtype=float) for s in size), indexing="ij")
        cx, cz = size[0] * rng.uniform(0.4, 0.6), size[2] * rng.uniform(0.4, 0.6)
        radius = rng.uniform(3.0, 4.5)
        bend = rng.uniform(-3, 3) * np.sin(np.pi * y / size[1])
        tube = ((x - cx - bend) ** 2 + (z - cz) ** 2 <= radius**2) & (y > 0.2 * size[1]) & (y < 0.8 * size[1])
        split = size[1] * rng.uniform(0.45, 0.55)
        label = np.where(tube, np.where(y > split, 1, 2), 0).astype(np.uint8)
        image = 40 + 25 * np.sin(x / 5.0) * np.cos(z / 7.0) + 45 * tube + rng.normal(0, 8, size)
        image = np.clip(image, 0, 255)
        image = image.astype(np.uint8) if case % 3 == 2 else image.astype(np.float32)
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        affine[:3, 3] = rng.uniform(-5, 5, 3).round(2)
        name = f"hippocampus_{case + 1:03d}.nii.gz"
        files = {root / "imagesTr" / name: image, root / "labelsTr" / name: label}
        for path, array in files.items():
            if path.exists():
                raise DataFormatError(path, "already exists; refusing to overwrite it with synthetic data")
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), str(path))
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    if with_dataset_json:
        content = {
            "name": "Hippocampus",
            "tensorImageSize": "3D",
            "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "numTraining": num_cases,
            "numTest": 0,
            "training": entries,
            "test": [],
        }
        (root / "dataset.json").write_text(json.dumps(content, indent=1) + "\n")
    return root
