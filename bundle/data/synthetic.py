"""Synthetic H&E nucleus tiles written in the MoNuSeg on-disk layout (TIFF + Aperio XML).

The tiles let the bundle train and test without the real data, through exactly the same
readers::

    root/MoNuSegTrainingData/Tissue_Images/synth_000.tif   RGB uint8, LZW TIFF
    root/MoNuSegTrainingData/Annotations/synth_000.xml     Aperio XML, one Region per nucleus
    root/MoNuSegTestData/synth_test_000.tif + .xml         flat test layout
    root/SYNTHETIC.json                                    manifest (written last)

Images are rendered with a Beer-Lambert stain model: optical density = haematoxylin
concentration x H vector + eosin concentration x E vector, RGB = 255 exp(-OD). Eosin gives a
pink fibrous background with pale gaps; haematoxylin fills the nuclei (irregular ellipses of
16-24 vertices, radius 5-12 px, 20-60 per 256 x 256 area, some overlapping, some cut by the tile
border with vertices up to 2.5 px outside it). Stain strength varies per tile and per nucleus,
and background haematoxylin varies in patches, so that no single intensity threshold
separates nuclei well while their shape and texture stay learnable. The mask is the scan-line
fill of the written polygons (:func:`bundle.data.aperio.rasterise_polygons`), blurred only in
the image. Everything derives from ``seed``: the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from bundle.data.aperio import rasterise_polygons
from bundle.data.errors import DataFormatError

__all__ = [
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "render_synthetic_tile",
    "write_synthetic_monuseg",
    "ensure_synthetic_monuseg",
]

#: bump whenever the rendered bytes change for the same arguments
GENERATOR_VERSION = 1
MANIFEST_NAME = "SYNTHETIC.json"
# OD directions fitted to the real MoNuSeg tiles: background OD ~ (0.33, 0.66, 0.43), nuclei add
# ~ (0.59, 0.79, 0.43) (close to Ruifrok & Johnston's haematoxylin (0.65, 0.70, 0.29))
_H_VECTOR = np.array([0.60, 0.74, 0.36])
_E_VECTOR = np.array([0.36, 0.77, 0.50])
_OUTSIDE = 2.5  # vertices may lie up to this far outside the tile, as in the real annotations


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean, unit std, shape ``shape``."""
    field = gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _nucleus_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """An irregular ellipse around (cx, cy): (K, 2) float (x, y), K in [16, 24], 3 decimals."""
    k = int(rng.integers(16, 25))
    minor = radius * rng.uniform(0.55, 1.0)
    tilt = rng.uniform(0.0, np.pi)
    t = 2.0 * np.pi * (np.arange(k) + rng.uniform(-0.3, 0.3, k)) / k
    ellipse = radius * minor / np.sqrt((minor * np.cos(t - tilt)) ** 2 + (radius * np.sin(t - tilt)) ** 2)
    wobble = np.ones(k)
    for harmonic in (2, 3, 4):
        wobble += rng.uniform(0.0, 0.07) * np.cos(harmonic * t + rng.uniform(0.0, 2.0 * np.pi))
    r = ellipse * wobble
    xy = np.stack((cx + r * np.cos(t), cy + r * np.sin(t)), axis=1)
    return np.round(np.clip(xy, -_OUTSIDE, size - 1 + _OUTSIDE), 3)


def _place_nuclei(rng: np.random.Generator, size: int) -> list[np.ndarray]:
    """20-60 nuclei per 256^2 area; centres rejected only when nearly engulfing a neighbour."""
    count = int(round(rng.integers(20, 61) * (size / 256.0) ** 2))
    centres: list[tuple[float, float, float]] = []
    for _ in range(count * 30):
        if len(centres) == count:
            break
        cx, cy, radius = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(5.0, 12.0)
        if all(np.hypot(cx - x, cy - y) > 0.6 * (radius + r) for x, y, r in centres):
            centres.append((cx, cy, radius))
    return [_nucleus_polygon(rng, cx, cy, radius, size) for cx, cy, radius in centres]


def render_synthetic_tile(seed: int | list[int], size: int = 256) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Render one synthetic H&E tile.

    Args:
        seed: seed (or seed sequence) of ``numpy.random.default_rng``.
        size: tile side S in pixels.

    Returns:
        ``(image, polygons, mask)``: uint8 (S, S, 3) RGB; one (K, 2) float (x, y) array per nucleus
        (3 decimals, exactly what the XML holds); uint8 (S, S) mask in {0, 1}, the fill of the
        polygons.
    """
    rng = np.random.default_rng(seed)
    shape = (size, size)
    polygons = _place_nuclei(rng, size)
    mask = rasterise_polygons(polygons, size, size)

    # per-tile stain: strength and a slightly rotated stain direction
    h_strength, e_strength = rng.uniform(0.55, 1.45), rng.uniform(0.6, 1.4)
    h_vector = np.abs(_H_VECTOR + rng.normal(0.0, 0.04, 3))
    e_vector = np.abs(_E_VECTOR + rng.normal(0.0, 0.04, 3))
    h_vector, e_vector = h_vector / np.linalg.norm(h_vector), e_vector / np.linalg.norm(e_vector)

    # eosin: fibrous stroma with pale gaps
    fibre_sigma = (rng.uniform(0.8, 2.0), rng.uniform(3.0, 6.0))
    fibres = _smooth_noise(rng, shape, fibre_sigma if rng.random() < 0.5 else fibre_sigma[::-1])
    texture = np.clip(1 + 0.3 * _smooth_noise(rng, shape, size / 12) + 0.12 * fibres, 0.1, None)
    eosin = rng.uniform(0.45, 0.85) * e_strength * texture
    gaps = _smooth_noise(rng, shape, size / 14) > rng.uniform(0.9, 1.6)
    eosin = np.where(gaps, 0.12 * eosin, eosin)

    # background haematoxylin in patches, some as dark as pale nuclei
    patches = np.clip(_smooth_noise(rng, shape, size / 10), 0.0, None)
    haem = h_strength * (rng.uniform(0.05, 0.12) + rng.uniform(0.15, 0.45) * patches)
    haem = haem * (1 + 0.2 * _smooth_noise(rng, shape, 1.0))
    haem = np.where(gaps, 0.3 * haem, haem)

    # nuclei: per-nucleus strength, chromatin texture, darker rim
    chromatin = 1 + 0.25 * _smooth_noise(rng, shape, 1.0)
    nuclei = np.zeros(shape)
    for polygon in polygons:
        one = rasterise_polygons([polygon], size, size).astype(bool)
        if not one.any():
            continue
        inner = gaussian_filter(one.astype(float), 1.5) > 0.9
        value = h_strength * rng.uniform(0.9, 2.0) * np.where(inner, rng.uniform(0.75, 1.0), 1.15)
        nuclei = np.where(one, np.maximum(nuclei, value * chromatin), nuclei)
    blur = rng.uniform(0.6, 1.2)
    nuclei = gaussian_filter(nuclei, blur)
    nucleus_cover = gaussian_filter(mask.astype(float), blur)
    haem = haem * (1 - nucleus_cover) + nuclei
    eosin = eosin * (1 - 0.7 * nucleus_cover)

    density = haem[..., None] * h_vector + eosin[..., None] * e_vector
    rgb = 255.0 * np.exp(-density) * rng.uniform(0.9, 1.0)
    rgb = gaussian_filter(rgb, (0.5, 0.5, 0)) + rng.normal(0.0, rng.uniform(2.0, 5.0), rgb.shape)
    image = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return image, polygons, mask


def _aperio_xml(polygons: list[np.ndarray]) -> str:
    """Aperio ImageScope XML text with one Region per polygon."""
    lines = [
        '<Annotations MicronsPerPixel="0.252700">',
        '\t<Annotation Id="1" Name="" ReadOnly="0" Type="4" LineColor="65280" Visible="1" Selected="1">',
        '\t\t<Attributes>\n\t\t\t<Attribute Name="Description" Id="0" Value=""/>\n\t\t</Attributes>',
        "\t\t<Regions>",
    ]
    for index, polygon in enumerate(polygons, start=1):
        lines.append(f'\t\t\t<Region Id="{index}" Type="0" Zoom="1" Selected="0" DisplayId="{index}">')
        lines.append("\t\t\t\t<Attributes/>\n\t\t\t\t<Vertices>")
        lines.extend(f'\t\t\t\t\t<Vertex X="{x:.3f}" Y="{y:.3f}"/>' for x, y in polygon.tolist())
        lines.append("\t\t\t\t</Vertices>\n\t\t\t</Region>")
    lines += ["\t\t</Regions>", "\t</Annotation>", "</Annotations>", ""]
    return "\n".join(lines)


def _targets(root: Path, num_train: int, num_test: int) -> list[tuple[Path, Path, list[int]]]:
    """(tif path, xml path, rng seed suffix) of every tile, training first."""
    train_dir = root / "MoNuSegTrainingData"
    test_dir = root / "MoNuSegTestData"
    targets = [
        (train_dir / "Tissue_Images" / f"synth_{i:03d}.tif", train_dir / "Annotations" / f"synth_{i:03d}.xml", [0, i])
        for i in range(num_train)
    ]
    targets += [
        (test_dir / f"synth_test_{i:03d}.tif", test_dir / f"synth_test_{i:03d}.xml", [1, i]) for i in range(num_test)
    ]
    return targets


def _manifest(num_train: int, num_test: int, size: int, seed: int) -> dict:
    return {
        "generator": "bundle.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_test": int(num_test),
        "size": int(size),
    }


def write_synthetic_monuseg(
    root: str | os.PathLike,
    num_train: int = 24,
    num_test: int = 6,
    size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic MoNuSeg dataset under ``root`` (layout in this module's docstring).

    Args:
        root: output folder (created if missing).
        num_train: training tiles (>= 0).
        num_test: test tiles (>= 0).
        size: tile side in pixels (>= 32).
        seed: all randomness derives from it (tile i of a subset uses ``[seed, subset, i]``).
        overwrite: replace existing files of the same names.

    Returns:
        ``root`` as an absolute Path.

    Raises:
        ValueError: bad counts or size.
        DataFormatError: a target file exists and ``overwrite`` is False (nothing is written).
    """
    if num_train < 0 or num_test < 0 or num_train + num_test == 0:
        raise ValueError(f"need num_train, num_test >= 0 and at least one tile, got {num_train}, {num_test}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    root = Path(root).expanduser().absolute()
    targets = _targets(root, num_train, num_test)
    if not overwrite:
        for path in [p for tif, xml, _ in targets for p in (tif, xml)] + [root / MANIFEST_NAME]:
            if path.exists():
                raise DataFormatError(path, "already exists; pass overwrite=True to replace synthetic files")
    for tif, xml, suffix in targets:
        image, polygons, _ = render_synthetic_tile([int(seed)] + suffix, size)
        tif.parent.mkdir(parents=True, exist_ok=True)
        xml.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="RGB").save(tif, format="TIFF", compression="tiff_lzw")
        xml.write_text(_aperio_xml(polygons))
    manifest = _manifest(num_train, num_test, size, seed)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return root


def _manifest_matches(root: Path, expected: dict) -> bool:
    """True when ``root`` holds our manifest with ``expected`` and all its files; raise on a different one."""
    path = root / MANIFEST_NAME
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataFormatError(
            path, f"unreadable synthetic-data manifest ({err}); remove the folder to regenerate"
        ) from None
    if found != expected:
        if not isinstance(found, dict):
            found = {}
        changed = ", ".join(f"{k}={found.get(k)!r} (requested {v!r})" for k, v in expected.items() if found.get(k) != v)
        raise DataFormatError(
            root,
            f"holds synthetic data made with different parameters: {changed}; remove the folder or choose another one",
        )
    targets = _targets(root, expected["num_train"], expected["num_test"])
    return all(tif.exists() and xml.exists() for tif, xml, _ in targets)


def ensure_synthetic_monuseg(
    root: str | os.PathLike, num_train: int = 24, num_test: int = 6, size: int = 256, seed: int = 0
) -> Path:
    """Make sure ``root`` holds the synthetic MoNuSeg data for these arguments; generate it if not.

    - ``root/SYNTHETIC.json`` with the same arguments and all files present: nothing is written.
    - same manifest but files missing: the set is regenerated in place (the folder is ours).
    - ``root`` missing or empty: generated in a temporary sibling folder and renamed into place,
      so concurrent callers (e.g. one per distributed rank) never see a half-written set.
    - anything else (a different manifest, or files without a manifest): DataFormatError; user
      data is never deleted or overwritten.

    Returns:
        ``root`` as an absolute Path.
    """
    root = Path(root).expanduser().absolute()
    expected = _manifest(num_train, num_test, size, seed)
    kwargs = dict(num_train=num_train, num_test=num_test, size=size, seed=seed)
    if (root / MANIFEST_NAME).exists():
        if not _manifest_matches(root, expected):
            write_synthetic_monuseg(root, overwrite=True, **kwargs)
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataFormatError(
            root, f"exists and is not a synthetic dataset (no {MANIFEST_NAME}); refusing to write into it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.tmp-{os.getpid()}"
    try:
        write_synthetic_monuseg(staging, overwrite=True, **kwargs)
        try:
            os.replace(staging, root)  # atomic; replaces an empty folder, fails on a non-empty one
        except OSError:
            if not (root / MANIFEST_NAME).exists():  # someone else wrote something else meanwhile
                raise DataFormatError(
                    root, "was filled by another process while generating; refusing to write"
                ) from None
            if not _manifest_matches(root, expected):
                write_synthetic_monuseg(root, overwrite=True, **kwargs)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return root
