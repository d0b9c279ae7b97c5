"""Chest X-ray reader: both on-disk layouts, masks, splits, the cxr.yaml pipelines, and the real Shenzhen pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from bundle.data.cxr import build_cxr_datalist, find_cxr_pairs, write_synthetic_cxr
from bundle.data.errors import DataFormatError
from bundle.transforms.chest_xray import LoadChestXrayd, LoadLungMaskd, read_grey_radiograph, read_lung_mask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    return write_synthetic_cxr(tmp_path_factory.mktemp("cxr") / "Lung_Segmentation", "kaggle", 6, 3, size=64)


@pytest.fixture(scope="module")
def montgomery(tmp_path_factory) -> Path:
    return write_synthetic_cxr(tmp_path_factory.mktemp("cxr") / "MontgomerySet", "montgomery", 0, 3, size=64, seed=1)


def _pipeline(name: str, image_size: int = 256):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in ("train.yaml", "methods/cdal.yaml", "datasets/cxr.yaml")])
    parser["image_size"] = parser["patch_size"] = image_size
    return parser.get_parsed_content(name)


def test_kaggle_layout_pairs_and_sources(kaggle):
    pairs = find_cxr_pairs(kaggle)
    assert len(pairs) == 9
    sources = {p["name"]: p["source"] for p in pairs}
    assert sources["CHNCXR_0001_0"] == "shenzhen" and sources["MCUCXR_0002_1"] == "montgomery"
    assert pairs[0]["label"].endswith("masks/CHNCXR_0001_0_mask.png")
    assert next(p for p in pairs if p["name"] == "MCUCXR_0001_0")["label"].endswith("masks/MCUCXR_0001_0.png")


def test_soft_masks_threshold_and_montgomery_masks_merge(kaggle, montgomery):
    soft = np.asarray(Image.open(kaggle / "masks" / "CHNCXR_0001_0_mask.png"))
    assert len(np.unique(soft)) > 2  # soft edges, as the resized real masks
    assert np.array_equal(read_lung_mask(kaggle / "masks" / "CHNCXR_0001_0_mask.png"), (soft > 127).astype(np.uint8))
    pair = next(p for p in find_cxr_pairs(montgomery) if p["name"] == "MCUCXR_0002_1")
    left, right = (np.asarray(Image.open(p)) > 127 for p in pair["label"])
    assert left.any() and right.any() and not (left & right).any()
    item = LoadLungMaskd(keys="label")(LoadChestXrayd(keys="image")(dict(pair)))
    assert item["image"].shape == (1, 64, 64) and item["label"].shape == (1, 64, 64)
    assert torch.equal(item["label"][0].bool(), torch.from_numpy(left | right))
    rgb = np.asarray(Image.open(pair["image"]).convert("RGB"), dtype=np.float32)
    assert np.allclose(read_grey_radiograph(pair["image"]), rgb.mean(axis=2))


def test_montgomery_image_with_one_lung_mask_is_an_error(montgomery, tmp_path):
    import shutil

    copy = tmp_path / "MontgomerySet"
    shutil.copytree(montgomery, copy)
    (copy / "ManualMask" / "rightMask" / "MCUCXR_0003_0.png").unlink()
    with pytest.raises(DataFormatError, match=r"rightMask/MCUCXR_0003_0\.png: missing"):
        find_cxr_pairs(copy)


def test_mask_of_another_size_is_named(kaggle, tmp_path):
    small = tmp_path / "small_mask.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(small)
    item = {"image": str(kaggle / "CXR_png" / "CHNCXR_0002_1.png"), "label": str(small)}
    message = r"small_mask\.png: mask size 32x32 .* differs from image .*CHNCXR_0002_1"
    with pytest.raises(DataFormatError, match=message):
        LoadLungMaskd(keys="label")(LoadChestXrayd(keys="image")(item))


def test_cross_validation_and_reference_split(kaggle, tmp_path):
    folds = [build_cxr_datalist(kaggle, fold=k, num_folds=3, val_fraction=0.2) for k in range(3)]
    tests = [sorted(c["name"] for c in d["test"]) for d in folds]
    assert sorted(sum(tests, [])) == sorted(p["name"] for p in find_cxr_pairs(kaggle))  # each pair tested once
    for datalist in folds:
        held_out = {c["name"] for c in datalist["test"]}
        assert held_out.isdisjoint(c["name"] for c in datalist["training"] + datalist["validation"])
        assert len(datalist["validation"]) == 1
    reference = build_cxr_datalist(kaggle, split="reference", output_json=tmp_path / "ref.json")
    assert {c["source"] for c in reference["training"] + reference["validation"]} == {"shenzhen"}
    assert sorted(c["name"] for c in reference["test"]) == ["MCUCXR_0001_0", "MCUCXR_0002_1", "MCUCXR_0003_0"]
    assert (tmp_path / "ref.json").is_file()


def test_config_pipelines_give_grey_images_and_lung_positive_labels(kaggle):
    pair = find_cxr_pairs(kaggle)[0]
    validation = _pipeline("validate#preprocessing", image_size=32)(dict(pair))
    assert validation["image"].shape == (1, 32, 32) and validation["label"].shape == (1, 32, 32)
    assert -1.0 <= float(validation["image"].min()) < float(validation["image"].max()) <= 1.0
    assert set(torch.unique(validation["label"]).tolist()) == {-1.0, 1.0}
    # lung (+1) is darker than the body in the image: the positive class is the lung, not the background
    image, label = validation["image"][0], validation["label"][0]
    assert float(image[label > 0].mean()) < float(image[label < 0].mean())
    cached = _pipeline("train#preprocessing", image_size=32)(dict(pair))
    trained = _pipeline("train#preprocessing_random", image_size=32)(cached)
    assert trained["image"].shape == (1, 32, 32) and set(torch.unique(trained["label"]).tolist()) <= {-1.0, 1.0}


@pytest.mark.realdata
def test_real_shenzhen_pairs(shared_data_dir):
    root = shared_data_dir / "cxr" / "Lung_Segmentation"
    pairs = find_cxr_pairs(root)
    assert len(pairs) == 10 and {p["source"] for p in pairs} == {"shenzhen"}
    fractions = []
    for pair in pairs:
        item = LoadLungMaskd(keys="label")(LoadChestXrayd(keys="image")(dict(pair)))
        assert item["image"].shape == (1, 512, 512)
        fractions.append(float(item["label"].mean()))
    # measured: 15.5 % (CHNCXR_0010_0) to 35.3 % (CHNCXR_0007_0, a large pair of lungs), mean 23.8 %
    assert min(fractions) >= 0.15 and max(fractions) <= 0.36 and 0.2 <= sum(fractions) / 10 <= 0.3, fractions
    item = _pipeline("validate#preprocessing")(dict(pairs[0]))
    assert item["image"].shape == (1, 256, 256) and 0.15 <= float((item["label"] > 0).float().mean()) <= 0.35
