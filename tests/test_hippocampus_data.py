"""MSD Task04 Hippocampus: reader, folds, volume checks, slice-wise reassembly and NIfTI predictions.

Synthetic volumes in the MSD layout (``write_synthetic_hippocampus``) for the logic; the real volumes in
``../shared/data/hippocampus`` (skipped when absent) for the reader and the reassembly round trip.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SliceInferer
from monai.transforms import LoadImaged

from bundle.data.errors import DataFormatError
from bundle.data.hippocampus import (
    build_hippocampus_datalist,
    find_msd_pairs,
    read_msd_classes,
    write_synthetic_hippocampus,
)
from bundle.metrics.binary import PerImageBinaryMetric
from bundle.transforms.volume import CheckVolumePaird, VoteArgmaxd
from bundle.transforms.writers import onehot_to_label_map, save_label_volume

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def synthetic_msd(tmp_path_factory) -> Path:
    return write_synthetic_hippocampus(tmp_path_factory.mktemp("msd") / "Task04_Hippocampus", num_cases=8, seed=3)


@pytest.fixture(scope="module")
def eval_preprocessing():
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in ("train.yaml", "methods/cdal.yaml", "datasets/hippocampus.yaml")])
    return parser.get_parsed_content("validate#preprocessing")


def _load_pair(item: dict) -> dict:
    loader = LoadImaged(keys=["image", "label"], reader="NibabelReader", ensure_channel_first=True, image_only=True)
    return CheckVolumePaird(keys="label", image_key="image", class_values=(0, 1, 2))(loader(item))


def test_reader_with_and_without_dataset_json(synthetic_msd, tmp_path):
    pairs = find_msd_pairs(synthetic_msd)
    assert [p["name"] for p in pairs] == [f"hippocampus_{i:03d}" for i in range(1, 9)]
    assert all(Path(p["image"]).is_file() and Path(p["label"]).is_file() for p in pairs)
    assert read_msd_classes(synthetic_msd) == {0: "background", 1: "anterior", 2: "posterior"}
    # the folder layout alone (and macOS side files, which MSD tarballs contain, are ignored)
    copy = tmp_path / "Task04"
    shutil.copytree(synthetic_msd, copy)
    (copy / "dataset.json").unlink()
    (copy / "imagesTr" / "._hippocampus_001.nii.gz").write_bytes(b"\x00")
    assert [p["name"] for p in find_msd_pairs(copy)] == [p["name"] for p in pairs]


def test_folds_are_unshuffled_partitions_written_to_json(synthetic_msd, tmp_path):
    out = tmp_path / "datalist.json"
    datalist = build_hippocampus_datalist(synthetic_msd, fold=1, num_folds=4, val_fraction=0.2, output_json=out)
    assert [c["name"] for c in datalist["test"]] == ["hippocampus_002", "hippocampus_006"]  # case i -> fold i % 4
    rest = datalist["training"] + datalist["validation"]
    assert len(rest) == 6 and len(datalist["validation"]) == 1 and all(c["fold"] != 1 for c in rest)
    written = json.loads(out.read_text())
    assert written["folds"]["hippocampus_005"] == 0 and written["fold"] == 1 and written["classes"]["2"] == "posterior"
    with pytest.raises(DataFormatError, match="different content"):  # another fold never replaces a written split
        build_hippocampus_datalist(synthetic_msd, fold=2, output_json=out)


def test_dataset_json_entry_with_missing_file_is_named(synthetic_msd, tmp_path):
    copy = tmp_path / "Task04"
    shutil.copytree(synthetic_msd, copy)
    (copy / "labelsTr" / "hippocampus_004.nii.gz").unlink()
    with pytest.raises(DataFormatError, match=r"labelsTr/hippocampus_004\.nii\.gz: missing.*dataset\.json"):
        find_msd_pairs(copy)


def test_bad_label_volumes_are_named(synthetic_msd, tmp_path):
    image = synthetic_msd / "imagesTr" / "hippocampus_001.nii.gz"
    reference = nib.load(image)
    wrong_shape = tmp_path / "short.nii.gz"
    nib.save(
        nib.Nifti1Image(np.zeros(np.array(reference.shape) - [0, 0, 2], np.uint8), reference.affine), str(wrong_shape)
    )
    with pytest.raises(DataFormatError, match=r"short\.nii\.gz: label shape .* differs from image .*hippocampus_001"):
        _load_pair({"image": str(image), "label": str(wrong_shape)})
    label = np.asarray(nib.load(synthetic_msd / "labelsTr" / "hippocampus_001.nii.gz").dataobj).copy()
    label[0, 0, 0] = 3
    bad_values = tmp_path / "three.nii.gz"
    nib.save(nib.Nifti1Image(label, reference.affine), str(bad_values))
    with pytest.raises(DataFormatError, match=r"three\.nii\.gz: label values 3 are outside the class list \[0, 1, 2\]"):
        _load_pair({"image": str(image), "label": str(bad_values)})


def _round_trip(preprocessing, image: Path, label: Path, out: Path) -> tuple[float, nib.Nifti1Image]:
    """Ground truth as the prediction: slice it, reassemble it, vote, score it and write it as NIfTI."""
    item = preprocessing({"image": str(image), "label": str(label)})
    onehot = item["label"][None]  # (1, 3, H, W, D) in {-1, 1}
    probs = SliceInferer(roi_size=(32, 32), spatial_dim=2, overlap=0.75, sw_batch_size=64)(
        onehot, lambda slices: (slices + 1) / 2
    )
    voted = VoteArgmaxd(keys="pred", class_names=["anterior", "posterior"])({"pred": probs[0], "label": item["label"]})
    metric = PerImageBinaryMetric("dice")
    metric(voted["pred"][None], voted["label"][None])
    assert metric.get_buffer().shape == (1, 2)  # anterior, posterior; background excluded
    affine = item["image"].meta["affine"].numpy()
    save_label_volume(onehot_to_label_map(voted["pred"]), affine, image, out)
    return float(metric.aggregate()), nib.load(out)


def test_reassembled_ground_truth_scores_one_and_keeps_the_header(synthetic_msd, eval_preprocessing, tmp_path):
    image, label = (synthetic_msd / d / "hippocampus_002.nii.gz" for d in ("imagesTr", "labelsTr"))
    dice, written = _round_trip(eval_preprocessing, image, label, tmp_path / "pred.nii.gz")
    original = nib.load(label)
    assert dice == 1.0
    assert np.array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj))
    assert np.array_equal(written.affine, nib.load(image).affine)
    assert written.get_data_dtype() == np.uint8
    with pytest.raises(FileExistsError):
        save_label_volume(np.zeros(original.shape, np.uint8), nib.load(image).affine, image, tmp_path / "pred.nii.gz")


def test_vote_argmax_ties_and_empty_votes():
    pred = torch.tensor([[0.9, 0.2, 0.6, 0.5], [0.8, 0.3, 0.1, 0.2], [0.1, 0.4, 0.7, 0.9]]).reshape(3, 1, 4)
    out = VoteArgmaxd(keys="pred", label_key=None, include_background=True)({"pred": pred})["pred"]
    # voxel 0: classes 0 and 1 vote -> 0 (tie to the lower); voxel 1: nobody -> 0; voxel 2: 0 and 2 -> 0; voxel 3: 2
    assert out.argmax(0).flatten().tolist() == [0, 0, 0, 2] and out.sum(0).eq(1).all()


@pytest.mark.realdata
def test_real_volumes_load_with_three_classes(shared_data_dir):
    root = shared_data_dir / "hippocampus" / "Task04_Hippocampus"
    pairs = find_msd_pairs(root)
    assert len(pairs) == 208
    values = set()
    for pair in pairs:
        loaded = _load_pair(dict(pair))
        values |= set(torch.unique(loaded["label"]).tolist())
    assert values == {0.0, 1.0, 2.0}
    datalist = build_hippocampus_datalist(root)
    assert len(datalist["test"]) == 52 and len(datalist["training"]) + len(datalist["validation"]) == 156


@pytest.mark.realdata
def test_real_volume_round_trip(shared_data_dir, eval_preprocessing, tmp_path):
    root = shared_data_dir / "hippocampus" / "Task04_Hippocampus"
    for case in ("hippocampus_001", "hippocampus_003"):  # uint8 and float32 images/labels
        image, label = root / "imagesTr" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz"
        dice, written = _round_trip(eval_preprocessing, image, label, tmp_path / f"{case}.nii.gz")
        assert dice == 1.0
        assert np.array_equal(np.asarray(written.dataobj), np.asarray(nib.load(label).dataobj).astype(np.uint8))
        assert np.array_equal(written.affine, nib.load(image).affine)
        assert written.header["descrip"] == nib.load(image).header["descrip"]
