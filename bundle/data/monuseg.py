"""MoNuSeg folders in their original layouts -> image/label pairs -> a JSON datalist.

Accepted layouts (folder names also in the spelling of the official zip files):

- training layout: ``root/Tissue_Images/*.tif`` with ``root/Annotations/*.xml`` and/or
  ``root/Binary_masks/*.png`` (subset ``"train"``);
- flat test layout: ``root/*.tif`` beside ``root/*.xml`` (subset ``"test"``);
- a parent folder holding ``MoNuSegTrainingData/`` and/or ``MoNuSegTestData/`` in either layout.

The XML is the ground truth; ``Binary_masks/<name>.png`` is used only for tiles without XML.
Test tiles never enter training or validation: models are selected on a validation split made
from the training tiles.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from bundle.data.errors import DataFormatError
from bundle.data.folds import write_datalist_json

__all__ = ["find_monuseg_pairs", "build_monuseg_datalist"]

IMAGE_SUFFIXES = (".tif", ".tiff")
MASK_SUFFIXES = (".png", ".tif", ".tiff")
TRAIN_DIR_NAMES = ("MoNuSegTrainingData", "MoNuSeg 2018 Training Data")
TEST_DIR_NAMES = ("MoNuSegTestData", "MoNuSeg 2018 Test Data")
TISSUE_DIR_NAMES = ("Tissue_Images", "Tissue Images")
XML_DIR_NAMES = ("Annotations",)
MASK_DIR_NAMES = ("Binary_masks", "Binary masks")


def _first_dir(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``root/<name>`` that is a directory, else None."""
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _files_by_stem(folder: Path | None, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Map file stem -> path for the files in ``folder`` with one of ``suffixes`` (case-insensitive)."""
    if folder is None:
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith("."):
            found.setdefault(path.stem, path)
    return found


def _pairs_in(
    folder: Path,
    subset: str,
    require_labels: bool,
    images: dict[str, Path],
    xmls: dict[str, Path],
    masks: dict[str, Path],
) -> list[dict[str, str]]:
    """Pair images with their XML (preferred) or mask; missing labels raise or warn."""
    pairs = []
    for name, image in sorted(images.items()):
        label = xmls.get(name) or masks.get(name)
        if label is None:
            problem = f"no annotation for this image (looked for {name}.xml and a Binary_masks/{name}.png in {folder})"
            if require_labels:
                raise DataFormatError(image, problem)
            warnings.warn(f"{image}: {problem}; skipped", UserWarning, stacklevel=3)
            continue
        pairs.append({"image": str(image), "label": str(label), "name": name, "subset": subset})
    for name in sorted(set(xmls) - set(images)):
        warnings.warn(f"{xmls[name]}: annotation without an image {name}.tif; ignored", UserWarning, stacklevel=3)
    return pairs


def _pairs_in_layout(folder: Path, subset: str | None, require_labels: bool) -> list[dict[str, str]] | None:
    """Pairs of one folder in the training or flat layout, or None when it is neither."""
    tissue = _first_dir(folder, TISSUE_DIR_NAMES)
    if tissue is not None:
        images = _files_by_stem(tissue, IMAGE_SUFFIXES)
        xmls = _files_by_stem(_first_dir(folder, XML_DIR_NAMES), (".xml",))
        masks = _files_by_stem(_first_dir(folder, MASK_DIR_NAMES), MASK_SUFFIXES)
        return _pairs_in(folder, subset or "train", require_labels, images, xmls, masks)
    images = _files_by_stem(folder, IMAGE_SUFFIXES)
    if images:
        xmls = _files_by_stem(folder, (".xml",))
        return _pairs_in(folder, subset or "test", require_labels, images, xmls, {})
    return None


def find_monuseg_pairs(
    root: str | os.PathLike, require_labels: bool = True, subset: str | None = None
) -> list[dict[str, str]]:
    """Find the MoNuSeg image/annotation pairs under ``root``.

    Args:
        root: a MoNuSeg folder in one of the layouts of this module's docstring.
        require_labels: when True (default) an image without annotation raises; when False it is
            skipped with a warning.
        subset: force the ``"subset"`` of every pair found when ``root`` itself is a training or
            flat folder (default: ``"train"`` for the training layout, ``"test"`` for the flat
            one). Ignored for a parent folder, whose sub-folder names decide.

    Returns:
        dicts with keys ``image`` (tif path), ``label`` (xml path, else the mask png path),
        ``name`` (file stem) and ``subset`` (``"train"`` or ``"test"``), sorted by (subset order
        train then test, name); paths are absolute strings.

    Raises:
        DataFormatError: ``root`` does not exist or holds no recognised layout, or an image has
            no annotation and ``require_labels`` is True.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DataFormatError(root, "MoNuSeg folder does not exist or is not a directory")
    train_dir, test_dir = _first_dir(root, TRAIN_DIR_NAMES), _first_dir(root, TEST_DIR_NAMES)
    if train_dir is not None or test_dir is not None:
        pairs: list[dict[str, str]] = []
        for folder, folder_subset in ((train_dir, "train"), (test_dir, "test")):
            if folder is None:
                continue
            found = _pairs_in_layout(folder, folder_subset, require_labels)
            if found is None:
                raise DataFormatError(folder, "holds neither Tissue_Images/ nor *.tif tiles")
            pairs.extend(found)
    else:
        found = _pairs_in_layout(root, subset, require_labels)
        if found is None:
            raise DataFormatError(
                root,
                "no MoNuSeg layout found: expected Tissue_Images/ (+ Annotations/ or Binary_masks/), *.tif with "
                "*.xml side by side, or MoNuSegTrainingData/ and/or MoNuSegTestData/",
            )
        pairs = found
    if not pairs:
        raise DataFormatError(root, "no annotated MoNuSeg tiles found")
    order = {"train": 0, "test": 1}
    return sorted(pairs, key=lambda p: (order.get(p["subset"], 2), p["subset"], p["name"]))


def build_monuseg_datalist(
    root: str | os.PathLike,
    val_fraction: float = 0.2,
    seed: int = 0,
    output_json: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, list[dict[str, str]]]:
    """Split the MoNuSeg training tiles into training/validation; list test tiles apart.

    The training tiles, sorted by name, are permuted with ``numpy.random.default_rng(seed)``; the
    first ``max(1, round(val_fraction * n))`` (at most ``n - 1``; none when ``n < 2`` or
    ``val_fraction == 0``) go to ``"validation"``, the rest to ``"training"``. Test tiles only
    ever go to ``"test"``. Each list is sorted by name.

    Args:
        root: MoNuSeg folder (see :func:`find_monuseg_pairs`).
        val_fraction: share of training tiles for validation, in [0, 1).
        seed: seed of the split permutation.
        output_json: when given, the datalist is written there (absolute paths). An existing file
            with different content is only replaced when ``overwrite`` is True; an identical one
            is left untouched.
        overwrite: allow replacing a different existing ``output_json``.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, each entry a dict with
        ``image``, ``label``, ``name``, ``subset``.

    Raises:
        ValueError: ``val_fraction`` outside [0, 1).
        DataFormatError: from :func:`find_monuseg_pairs`, or ``output_json`` exists with different
            content and ``overwrite`` is False.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    pairs = find_monuseg_pairs(root)
    train = sorted((p for p in pairs if p["subset"] == "train"), key=lambda p: p["name"])
    test = sorted((p for p in pairs if p["subset"] == "test"), key=lambda p: p["name"])
    n = len(train)
    n_val = 0 if n < 2 or val_fraction == 0 else min(n - 1, max(1, int(round(val_fraction * n))))
    permutation = np.random.default_rng(seed).permutation(n)
    val_index = {int(i) for i in permutation[:n_val]}
    datalist = {
        "training": [p for i, p in enumerate(train) if i not in val_index],
        "validation": [p for i, p in enumerate(train) if i in val_index],
        "test": test,
    }
    if output_json is not None:
        _write_json(Path(output_json).expanduser().absolute(), datalist, overwrite)
    return datalist


def _write_json(path: Path, content: dict, overwrite: bool) -> None:
    """Write ``content`` as JSON atomically; refuse to replace a different file unless ``overwrite``."""
    write_datalist_json(path, content, overwrite)
