"""Synthetic MoNuSeg-format data: round trip through the real readers, determinism, safety."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle.data.aperio import read_aperio_xml
from bundle.data.errors import DataFormatError
from bundle.data.monuseg import find_monuseg_pairs
from bundle.data.synthetic import (
    MANIFEST_NAME,
    ensure_synthetic_monuseg,
    render_synthetic_tile,
    write_synthetic_monuseg,
)
from bundle.transforms.io import LoadInstanceMaskd, LoadTiled

SMALL = dict(num_train=3, num_test=2, size=96)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return write_synthetic_monuseg(tmp_path_factory.mktemp("synthetic") / "a", seed=1, **SMALL)


def test_layout_and_formats(small_root):
    files = all_files(small_root)
    assert sorted(files) == [
        "MoNuSegTestData/synth_test_000.tif",
        "MoNuSegTestData/synth_test_000.xml",
        "MoNuSegTestData/synth_test_001.tif",
        "MoNuSegTestData/synth_test_001.xml",
        "MoNuSegTrainingData/Annotations/synth_000.xml",
        "MoNuSegTrainingData/Annotations/synth_001.xml",
        "MoNuSegTrainingData/Annotations/synth_002.xml",
        "MoNuSegTrainingData/Tissue_Images/synth_000.tif",
        "MoNuSegTrainingData/Tissue_Images/synth_001.tif",
        "MoNuSegTrainingData/Tissue_Images/synth_002.tif",
        MANIFEST_NAME,
    ]
    manifest = json.loads(files[MANIFEST_NAME])
    assert manifest["seed"] == 1 and manifest["num_train"] == 3 and manifest["size"] == 96 and "version" in manifest
    with Image.open(small_root / "MoNuSegTrainingData/Tissue_Images/synth_000.tif") as tif:
        assert tif.mode == "RGB" and tif.size == (96, 96) and tif.info["compression"] == "tiff_lzw"
    for xml in small_root.rglob("*.xml"):
        polygons = read_aperio_xml(xml)
        assert len(polygons) >= 3
        assert all(16 <= len(p) <= 24 for p in polygons)


def test_round_trip_through_readers(small_root):
    pairs = find_monuseg_pairs(small_root)
    assert [p["subset"] for p in pairs] == ["train"] * 3 + ["test"] * 2
    load = [LoadTiled(keys="image"), LoadInstanceMaskd(keys="label", image_key="image")]
    seeds = [[1, 0, i] for i in range(3)] + [[1, 1, i] for i in range(2)]
    for pair, seed in zip(pairs, seeds):
        data = dict(pair)
        for transform in load:
            data = transform(data)
        image, polygons, mask = render_synthetic_tile(seed, 96)
        np.testing.assert_array_equal(data["image"].numpy().astype(np.uint8), image.transpose(2, 0, 1))
        np.testing.assert_array_equal(data["label"][0].numpy(), mask)
        assert data["label"].shape == (1, 96, 96) and 0.02 < mask.mean() < 0.5
        written = read_aperio_xml(pair["label"])
        assert len(written) == len(polygons) and all(np.array_equal(a, b) for a, b in zip(written, polygons))


def test_some_vertices_slightly_outside():
    outside = []
    for i in range(6):
        _, polygons, _ = render_synthetic_tile([0, 0, i], 128)
        vertices = np.concatenate(polygons)
        outside.append(((vertices < 0) | (vertices > 127)).any())
        assert vertices.min() >= -2.5 and vertices.max() <= 127 + 2.5
    assert any(outside)


def test_same_seed_identical_bytes_different_seed_differs(small_root, tmp_path):
    again = write_synthetic_monuseg(tmp_path / "b", seed=1, **SMALL)
    assert all_files(again) == all_files(small_root)
    other = write_synthetic_monuseg(tmp_path / "c", seed=2, **SMALL)
    tile = "MoNuSegTrainingData/Tissue_Images/synth_000.tif"
    assert all_files(other)[tile] != all_files(small_root)[tile]


def test_not_separable_by_one_threshold_but_nuclei_darker():
    """Stain varies per tile: the best single grey threshold over 6 tiles stays far from perfect."""
    tiles = [render_synthetic_tile([0, 0, i], 128) for i in range(6)]
    grey = np.stack([t[0].mean(-1) for t in tiles])
    masks = np.stack([t[2] for t in tiles]).astype(bool)
    assert grey[masks].mean() < grey[~masks].mean() - 20  # a signal to learn
    best = 0.0
    for threshold in np.percentile(grey, np.linspace(1, 99, 99)):
        pred = grey < threshold
        best = max(best, 2 * (pred & masks).sum() / (pred.sum() + masks.sum()))
    assert best < 0.8


def test_write_refuses_existing_files(small_root):
    with pytest.raises(DataFormatError, match="already exists") as info:
        write_synthetic_monuseg(small_root, seed=1, **SMALL)
    assert "synth_000.tif" in str(info.value)


def test_ensure_generates_once_and_refuses_foreign_folders(tmp_path):
    root = ensure_synthetic_monuseg(tmp_path / "data", seed=3, **SMALL)
    manifest = root / MANIFEST_NAME
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_synthetic_monuseg(tmp_path / "data", seed=3, **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamp  # nothing rewritten
    assert manifest.exists() and not list(tmp_path.glob(".*tmp*"))

    with pytest.raises(DataFormatError, match="different") as info:
        ensure_synthetic_monuseg(root, seed=4, **SMALL)
    assert str(info.value).startswith(str(root))

    foreign = tmp_path / "user_data"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataFormatError, match="not a synthetic dataset") as info:
        ensure_synthetic_monuseg(foreign, **SMALL)
    assert str(info.value).startswith(str(foreign))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (ensure_synthetic_monuseg(empty, **SMALL) / MANIFEST_NAME).exists()
