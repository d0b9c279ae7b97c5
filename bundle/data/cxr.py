"""Chest X-ray lung segmentation (Shenzhen, Montgomery) in their original layouts -> pairs -> fold datalists.

Accepted layouts under ``root`` (``root`` itself, or each of its sub-folders holding one of them):

- "Chest X-ray masks and labels" (the Kaggle collection cDAL uses): ``CXR_png/<stem>.png`` with
  ``masks/<stem>_mask.png`` (Shenzhen naming) or ``masks/<stem>.png`` (Montgomery naming). Images without a
  mask (the collection has 800 images and 704 masks) are skipped with one warning.
- the original Montgomery set: ``CXR_png/<stem>.png`` with ``ManualMask/leftMask/<stem>.png`` and
  ``ManualMask/rightMask/<stem>.png``; the two lung masks are merged (union) when loaded.

Every pair records its ``source``: ``"shenzhen"`` for ``*_mask`` masks, ``"montgomery"`` for same-name masks and
the ManualMask layout. The reference split (cDAL's only CXR split, METHODS.md 1.5) trains on Shenzhen and tests
on Montgomery; the default here is 3-fold cross-validation over all pairs. In this project the lung is the
positive class (label 1) in training and in every metric; the reference code inverts the mask (lung = -1) and
inverts it back before scoring, so its reported scores are also lung-as-positive.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bundle.data.errors import DataFormatError
from bundle.data.folds import fold_datalist, write_datalist_json

__all__ = ["find_cxr_pairs", "build_cxr_datalist", "write_synthetic_cxr", "CXR_SPLITS"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
CXR_SPLITS = ("cv", "reference")


def _files_by_stem(folder: Path) -> dict[str, Path]:
    """stem -> path of the image files directly in ``folder`` (hidden files ignored)."""
    return {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    }


def _kaggle_pairs(folder: Path) -> list[dict[str, Any]]:
    images, masks = _files_by_stem(folder / "CXR_png"), _files_by_stem(folder / "masks")
    pairs, unlabelled, used = [], [], set()
    for stem, image in sorted(images.items()):
        if stem + "_mask" in masks:
            mask, source = masks[stem + "_mask"], "shenzhen"
        elif stem in masks:
            mask, source = masks[stem], "montgomery"
        else:
            unlabelled.append(stem)
            continue
        used.add(mask.stem)
        pairs.append({"image": str(image), "label": str(mask), "name": stem, "source": source})
    if unlabelled:
        warnings.warn(
            f"{folder / 'CXR_png'}: {len(unlabelled)} image(s) without a mask in masks/ skipped (e.g. {unlabelled[0]})",
            UserWarning,
            stacklevel=3,
        )
    orphans = sorted(set(masks) - used)
    if orphans:
        warnings.warn(
            f"{folder / 'masks'}: {len(orphans)} mask(s) without an image in CXR_png/ ignored (e.g. {orphans[0]})",
            UserWarning,
            stacklevel=3,
        )
    return pairs


def _montgomery_pairs(folder: Path) -> list[dict[str, Any]]:
    images = _files_by_stem(folder / "CXR_png")
    left = _files_by_stem(folder / "ManualMask" / "leftMask")
    right = _files_by_stem(folder / "ManualMask" / "rightMask")
    pairs = []
    for stem, image in sorted(images.items()):
        if stem not in left and stem not in right:
            warnings.warn(f"{image}: no lung masks in ManualMask/; skipped", UserWarning, stacklevel=3)
            continue
        for side, masks in (("leftMask", left), ("rightMask", right)):
            if stem not in masks:
                raise DataFormatError(
                    folder / "ManualMask" / side / f"{stem}.png",
                    f"missing: image {image.name} has only one of its two lung masks",
                )
        pairs.append(
            {"image": str(image), "label": [str(left[stem]), str(right[stem])], "name": stem, "source": "montgomery"}
        )
    return pairs


def _pairs_in(folder: Path) -> list[dict[str, Any]] | None:
    """Pairs of one folder in a known layout, or None when it holds none."""
    if not (folder / "CXR_png").is_dir():
        return None
    if (folder / "masks").is_dir():
        return _kaggle_pairs(folder)
    if (folder / "ManualMask").is_dir():
        return _montgomery_pairs(folder)
    raise DataFormatError(folder, "has CXR_png/ but neither masks/ nor ManualMask/{leftMask,rightMask}/")


def find_cxr_pairs(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Find the labelled chest X-rays under ``root`` (layouts in this module's docstring).

    Returns:
        dicts ``{"image": path, "label": mask path or [left, right] paths, "name": stem, "source":
        "shenzhen" | "montgomery"}`` sorted by name; absolute paths.

    Raises:
        DataFormatError: ``root`` missing, no known layout, a Montgomery image with only one lung mask, no pairs,
            or two pairs with the same name.
    """
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise DataFormatError(root, "chest X-ray folder does not exist or is not a directory")
    found = _pairs_in(root)
    if found is None:
        parts = [_pairs_in(sub) for sub in sorted(root.iterdir()) if sub.is_dir() and not sub.name.startswith(".")]
        if all(p is None for p in parts):
            raise DataFormatError(
                root,
                "no chest X-ray layout found: expected CXR_png/ with masks/ or "
                "ManualMask/{leftMask,rightMask}/, here or in a sub-folder",
            )
        found = [pair for part in parts if part for pair in part]
    if not found:
        raise DataFormatError(root, "no image with a lung mask found")
    names = [p["name"] for p in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataFormatError(root, f"image name {duplicates[0]!r} occurs in more than one folder")
    return sorted(found, key=lambda p: p["name"])


def build_cxr_datalist(
    root: str | os.PathLike,
    fold: int = 0,
    num_folds: int = 3,
    split: str = "cv",
    val_fraction: float = 0.2,
    seed: int = 0,
    output_json: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Training/validation/test lists for one fold of the chest X-ray data.

    Args:
        root: folder in one of the accepted layouts.
        fold: held-out fold for ``split="cv"`` (ignored by ``"reference"``).
        num_folds: K for ``split="cv"`` (the cDAL issue's protocol: 3).
        split: ``"cv"``: K folds over all pairs (a seeded permutation, so both sources mix in every fold);
            ``"reference"``: the cDAL split, Shenzhen for training/validation, Montgomery as ``test``.
        val_fraction: share of the training pairs used for model selection.
        seed: seed of the fold permutation and of the validation share.
        output_json: where to write the datalist (identical files are kept; different ones need ``overwrite``).
        overwrite: replace a different existing ``output_json``.
    """
    if split not in CXR_SPLITS:
        raise ValueError(f"unknown CXR split {split!r}; choose one of {CXR_SPLITS}")
    pairs = find_cxr_pairs(root)
    if split == "cv":
        datalist = fold_datalist(
            pairs, fold, num_folds, val_fraction, seed, shuffle_seed=seed, extra={"split": "cv", "dataset": "cxr"}
        )
    else:
        train = [p for p in pairs if p["source"] == "shenzhen"]
        test = [p for p in pairs if p["source"] == "montgomery"]
        if not train:
            raise DataFormatError(Path(root), "the reference split needs Shenzhen pairs (masks named *_mask)")
        n_val = 0 if len(train) < 2 else min(len(train) - 1, max(1, int(round(val_fraction * len(train)))))
        val_index = {int(i) for i in np.random.default_rng(seed).permutation(len(train))[:n_val]}
        datalist = {
            "training": [p for i, p in enumerate(train) if i not in val_index],
            "validation": [p for i, p in enumerate(train) if i in val_index],
            "test": test,
            "split": "reference",
            "dataset": "cxr",
        }
    if output_json is not None:
        write_datalist_json(output_json, datalist, overwrite)
    return datalist


def _synthetic_chest(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grey image uint8, left lung {0,1}, right lung {0,1}), each (size, size); lungs darker than the body."""
    rows, cols = np.mgrid[0:size, 0:size] / size
    body = 150 + 60 * np.exp(-(((cols - 0.5) / 0.42) ** 4)) + rng.normal(0, 6, (size, size))
    lungs = []
    for centre in (0.31, 0.69):
        cy, cx = rng.uniform(0.46, 0.54), centre + rng.uniform(-0.03, 0.03)
        ry, rx = rng.uniform(0.26, 0.32), rng.uniform(0.11, 0.15)
        lungs.append((((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1.0).astype(np.uint8))
    inside = np.maximum(*lungs).astype(float)
    image = body - rng.uniform(70, 100) * inside + 10 * np.sin(rows * 40) * inside
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), lungs[0], lungs[1]


def write_synthetic_cxr(
    root: str | os.PathLike,
    layout: str = "kaggle",
    num_shenzhen: int = 4,
    num_montgomery: int = 2,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write small synthetic chest X-rays in one of the accepted on-disk layouts (for tests and smoke runs).

    ``layout="kaggle"``: ``CXR_png/CHNCXR_XXXX_0.png`` + ``masks/CHNCXR_XXXX_0_mask.png`` (grey masks with soft,
    0-255 edges, as the resized real ones) and ``CXR_png/MCUCXR_XXXX_0.png`` + ``masks/MCUCXR_XXXX_0.png``.
    ``layout="montgomery"``: ``CXR_png/MCUCXR_XXXX_0.png`` + ``ManualMask/{leftMask,rightMask}/`` binary 0/255
    masks (``num_shenzhen`` is ignored). Images are RGB PNGs with equal channels; deterministic by ``seed``.
    Existing files are never replaced.
    """
    if layout not in ("kaggle", "montgomery"):
        raise ValueError(f"layout must be 'kaggle' or 'montgomery', got {layout!r}")
    root = Path(root).expanduser().absolute()
    rng = np.random.default_rng(seed)
    cases = [] if layout == "montgomery" else [f"CHNCXR_{i + 1:04d}_{i % 2}" for i in range(num_shenzhen)]
    cases += [f"MCUCXR_{i + 1:04d}_{i % 2}" for i in range(num_montgomery)]
    for stem in cases:
        image, left, right = _synthetic_chest(rng, size)
        files: dict[Path, np.ndarray] = {root / "CXR_png" / f"{stem}.png": np.repeat(image[..., None], 3, axis=2)}
        if layout == "montgomery":
            files[root / "ManualMask" / "leftMask" / f"{stem}.png"] = left * 255
            files[root / "ManualMask" / "rightMask" / f"{stem}.png"] = right * 255
        else:
            soft = np.maximum(left, right).astype(float)
            soft = (soft + np.roll(soft, 1, 0) + np.roll(soft, 1, 1) + np.roll(soft, (1, 1), (0, 1))) / 4
            mask_name = f"{stem}_mask.png" if stem.startswith("CHN") else f"{stem}.png"
            files[root / "masks" / mask_name] = np.rint(soft * 255)
        for path, array in files.items():
            if path.exists():
                raise DataFormatError(path, "already exists; refusing to overwrite it with synthetic data")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array.astype(np.uint8)).save(path)
    return root
