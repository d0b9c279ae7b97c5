"""Synthetic LIDC-style lesion crops with four disagreeing annotators, in the real on-disk layouts.

Crop layout (what ``../shared/data/lidc`` holds)::

    root/training/<i>/image_<i + 1>.jpg  label0_.jpg .. label3_.jpg    128x128 grey JPEG, masks 0/255 as JPEG
    root/testing/<j>/...
    root/SYNTHETIC_LIDC.json                                          manifest (written last)

and Knegt's pickle layout (:func:`write_synthetic_lidc_pickle`): a dict keyed ``LIDC-IDRI-<p>_slice<s>`` with
``image`` (float32 in [0, 1]), ``masks`` (4 uint8 arrays in {0, 1}) and ``series_uid``.

Each crop is dark lung parenchyma (smooth texture, a few small bright vessels) with a nodule near the centre: a
bright blob with a soft edge and an irregular outline (radius 4-14 px, contrast 0.15-0.7; half of the crops also show the chest wall). Every annotator outlines
it with their own radius scale (about +-12 %) and outline wobble, and misses faint nodules with a probability that
grows as the contrast falls, so some masks are empty and the annotators disagree most where the image is ambiguous.
Everything derives from ``seed``; the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from bundle.data.errors import DataFormatError
from bundle.files import atomic_output

__all__ = [
    "render_synthetic_lidc_case",
    "write_synthetic_lidc",
    "ensure_synthetic_lidc",
    "write_synthetic_lidc_pickle",
    "LIDC_MANIFEST_NAME",
]

LIDC_MANIFEST_NAME = "SYNTHETIC_LIDC.json"
GENERATOR_VERSION = 1


def _smooth(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    field = gaussian_filter(rng.standard_normal((size, size)), sigma)
    return field / (field.std() + 1e-8)


def _outline(rng: np.random.Generator, amplitude: float, harmonics: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Random smooth periodic radius factor: (amplitudes, phases) of ``harmonics`` cosines."""
    return rng.normal(0, amplitude, harmonics) / np.arange(1, harmonics + 1), rng.uniform(0, 2 * np.pi, harmonics)


def _radius(theta: np.ndarray, base: float, outline: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    amps, phases = outline
    k = np.arange(2, 2 + len(amps))[:, None, None]
    return base * (1 + (amps[:, None, None] * np.cos(k * theta[None] + phases[:, None, None])).sum(0))


def render_synthetic_lidc_case(
    seed: int | list[int], size: int = 128, num_annotators: int = 4
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One crop: (image (size, size) uint8, [mask (size, size) uint8 in {0, 1}] * num_annotators)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    image = 0.06 + 0.02 * _smooth(rng, size, 6.0) + 0.01 * _smooth(rng, size, 1.5)
    if rng.random() < 0.5:  # chest wall entering from one side
        axis, edge = (yy, xx)[rng.integers(2)], rng.uniform(0.75, 0.95) * size
        image += 0.5 / (1 + np.exp(-(edge - (size - 1 - axis if rng.random() < 0.5 else axis)) / -2.0))
    for _ in range(rng.integers(2, 6)):  # vessels
        vy, vx, vr = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1.0, 3.0)
        image += rng.uniform(0.15, 0.4) * np.exp(-((yy - vy) ** 2 + (xx - vx) ** 2) / (2 * vr**2))
    cy, cx = size / 2 + rng.uniform(-8, 8, 2)
    base = rng.uniform(4.0, 14.0) * size / 128
    contrast = rng.uniform(0.15, 0.7)
    dist, theta = np.hypot(yy - cy, xx - cx), np.arctan2(yy - cy, xx - cx)
    true_radius = _radius(theta, base, _outline(rng, 0.25))
    image += contrast * (1 / (1 + np.exp((dist - true_radius) / 1.2)))
    image += 0.015 * rng.standard_normal((size, size))
    image_u8 = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    mark_probability = float(np.clip((contrast - 0.1) / 0.25, 0.15, 1.0))
    masks = []
    for _ in range(num_annotators):
        scale = 1.0 + rng.normal(0, 0.12)
        wobble = _outline(rng, 0.08)
        marks = rng.random() < mark_probability
        drawn = (dist < true_radius * _radius(theta, scale, wobble)) if marks else np.zeros((size, size), bool)
        masks.append(drawn.astype(np.uint8))
    return image_u8, masks


def _cases(root: Path, num_train: int, num_test: int) -> list[tuple[Path, int, list[int]]]:
    """(case folder, image number, rng suffix) of every case, training first (ids continue across subsets)."""
    out = [(root / "training" / str(i), i + 1, [0, i]) for i in range(num_train)]
    out += [(root / "testing" / str(num_train + j), num_train + j + 1, [1, j]) for j in range(num_test)]
    return out


def _manifest(num_train: int, num_test: int, size: int, seed: int) -> dict:
    return {
        "generator": "bundle.data.lidc_synthetic",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_test": int(num_test),
        "size": int(size),
    }


def write_synthetic_lidc(
    root: str | os.PathLike,
    num_train: int = 16,
    num_test: int = 4,
    size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write synthetic crops in the crop layout under ``root``; returns ``root`` (absolute).

    Raises:
        ValueError: bad counts or size.
        DataFormatError: a target file exists and ``overwrite`` is False (nothing is written).
    """
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    root = Path(root).expanduser().absolute()
    cases = _cases(root, num_train, num_test)
    if not overwrite:
        for folder, number, _ in cases:
            if (folder / f"image_{number}.jpg").exists():
                raise DataFormatError(folder, "already holds a case; pass overwrite=True to replace synthetic files")
    for folder, number, suffix in cases:
        image, masks = render_synthetic_lidc_case([int(seed)] + suffix, size)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"image_{number}.jpg", quality=95)
        for k, mask in enumerate(masks):
            Image.fromarray(mask * 255, mode="L").save(folder / f"label{k}_.jpg", quality=90)
    manifest = _manifest(num_train, num_test, size, seed)
    (root / LIDC_MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return root


def _complete(root: Path, manifest: dict) -> bool:
    cases = _cases(root, manifest["num_train"], manifest["num_test"])
    return all((f / f"image_{n}.jpg").exists() and (f / "label3_.jpg").exists() for f, n, _ in cases)


def ensure_synthetic_lidc(
    root: str | os.PathLike, num_train: int = 16, num_test: int = 4, size: int = 128, seed: int = 0
) -> Path:
    """Make sure ``root`` holds the synthetic crops for these arguments; generate them if not.

    An existing manifest with the same arguments is reused (missing files regenerated); a different manifest, or a
    non-empty folder without one, raises DataFormatError (user data is never overwritten). A new set is written to a
    temporary sibling and renamed into place, so concurrent callers never see half a set.
    """
    root = Path(root).expanduser().absolute()
    expected = _manifest(num_train, num_test, size, seed)
    kwargs = dict(num_train=num_train, num_test=num_test, size=size, seed=seed)
    manifest_path = root / LIDC_MANIFEST_NAME
    if manifest_path.exists():
        try:
            found = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise DataFormatError(manifest_path, f"unreadable manifest ({err}); remove the folder") from None
        if found != expected:
            raise DataFormatError(
                root, f"holds synthetic LIDC data made with {found}, not {expected}; use another folder"
            )
        if not _complete(root, expected):
            write_synthetic_lidc(root, overwrite=True, **kwargs)
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataFormatError(
            root, f"exists and is not a synthetic LIDC set (no {LIDC_MANIFEST_NAME}); refusing to write into it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.tmp-{os.getpid()}"
    try:
        write_synthetic_lidc(staging, overwrite=True, **kwargs)
        try:
            os.replace(staging, root)
        except OSError:
            if not (manifest_path.exists() and json.loads(manifest_path.read_text()) == expected):
                raise DataFormatError(
                    root, "was filled by another process while generating; refusing to write"
                ) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return root


def write_synthetic_lidc_pickle(
    path: str | os.PathLike,
    num_patients: int = 5,
    slices_per_patient: int = 2,
    size: int = 128,
    seed: int = 0,
    with_series_uid: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a small LIDC pickle in Knegt's layout (see the module docstring); returns the path."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not overwrite:
        raise DataFormatError(path, "already exists; pass overwrite=True to replace it")
    data = {}
    for p in range(num_patients):
        for s in range(slices_per_patient):
            image, masks = render_synthetic_lidc_case([int(seed), 2, p, s], size)
            entry = {"image": image.astype(np.float32) / 255.0, "masks": masks}
            if with_series_uid:
                entry["series_uid"] = f"1.3.6.1.4.1.9328.50.3.{p:04d}"
            data[f"LIDC-IDRI-{p:04d}_slice{s}"] = entry
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    return path
