"""Training, validation and evaluation check every input before computing and name all bad files at once
(bundle/data/checks.py: ``CheckedCacheDataset`` for the cached training/validation lists, ``checked_items`` for an
evaluation split).

Real files in the MSD Task04 layout (small synthetic volumes), spoiled the ways files are spoiled: a download cut
short, a label with a value outside the classes, an all-NaN scan.
"""

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from bundle.data.checks import CheckedCacheDataset, checked_items
from bundle.data.errors import DataFormatError
from bundle.data.hippocampus import write_synthetic_hippocampus

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [str(REPO / "configs" / name) for name in ("train.yaml", "datasets/hippocampus.yaml")]


def spoil(msd: Path) -> dict[str, str]:
    """Spoil three of the cases; returns file -> the problem the check must name."""
    images, labels = msd / "imagesTr", msd / "labelsTr"
    whole = (images / "hippocampus_001.nii.gz").read_bytes()
    (images / "hippocampus_001.nii.gz").write_bytes(whole[: len(whole) // 2])
    label = nib.load(labels / "hippocampus_002.nii.gz")
    values = np.asarray(label.dataobj).copy()
    values[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(values, label.affine), labels / "hippocampus_002.nii.gz")
    scan = nib.load(images / "hippocampus_004.nii.gz")
    nib.save(nib.Nifti1Image(np.full(scan.shape, np.nan, np.float32), scan.affine), images / "hippocampus_004.nii.gz")
    return {
        str(images / "hippocampus_001.nii.gz"): "not a readable NIfTI volume (EOFError",
        str(labels / "hippocampus_002.nii.gz"): "7",
        str(images / "hippocampus_004.nii.gz"): "non-finite (NaN or inf) values",
    }


@pytest.fixture()
def spoiled(tmp_path):
    msd = write_synthetic_hippocampus(tmp_path / "Task04", num_cases=6, shape=(14, 18, 15), seed=5)
    return msd, spoil(msd)


def parser_for(msd: Path, root: Path) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(CONFIGS)
    parser.update({"dataset_dir": str(msd), "bundle_root": str(root), "num_folds": 2, "val_fraction": 0.0})
    return parser


def test_the_cached_training_list_names_every_bad_file_at_once(spoiled, tmp_path):
    msd, expected = spoiled
    parser = parser_for(msd, tmp_path / "run")
    items = [dict(case) for case in parser.get_parsed_content("datalist")["training"]]
    items += [dict(case) for case in parser.get_parsed_content("datalist")["test"]]  # all six cases
    transform = parser.get_parsed_content("train#preprocessing")
    with pytest.raises(DataFormatError) as caught:
        CheckedCacheDataset(items, transform, role="training", image_channels=1, spatial_ndim=3, progress=False)
    message = str(caught.value)
    assert f"3 of {len(items)} training items are unusable" in message
    for path, problem in expected.items():
        assert f"{path}: " in message and problem in message.split(f"{path}: ", 1)[1], (path, message)
    assert "hippocampus_003" not in message and "hippocampus_005" not in message
    good = [case for case in items if all(str(v) not in expected for v in case.values())]
    assert len(CheckedCacheDataset(good, transform, image_channels=1, spatial_ndim=3, progress=False)) == len(good)


def test_an_evaluation_split_is_checked_before_the_first_volume_is_scored(spoiled, tmp_path):
    msd, expected = spoiled
    parser = parser_for(msd, tmp_path / "run")
    items = [dict(case) for case in parser.get_parsed_content("datalist")["training"]]
    transform = parser.get_parsed_content("validate#preprocessing")
    bad = [case for case in items if str(case["image"]) in expected or str(case["label"]) in expected]
    assert bad, "the first fold's training half must hold a spoiled case"
    with pytest.raises(
        DataFormatError,
        match=f"{len(bad)} of {len(items)} evaluation items are unusable"
        if len(bad) > 1
        else "checked before computing",
    ) as caught:
        checked_items(items, transform, "evaluation", 1, 3)
    for case in bad:
        assert Path(case["image"]).name in str(caught.value)
    good = [case for case in items if case not in bad]
    assert checked_items(good, transform, "evaluation", 1, 3) == good


def test_training_stops_before_the_first_iteration_naming_every_bad_file(spoiled, tmp_path):
    msd, expected = spoiled
    root = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS),
         "--dataset_dir", str(msd), "--bundle_root", str(root), "--num_folds", "2", "--val_fraction", "0.0",
         "--max_epochs", "1", "--epoch_length", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "training items are unusable" in last, last
    named = [path for path in expected if path in last]
    assert named, last  # every spoiled file of the training fold, in the one line
    assert "Epoch[1] Complete" not in run.stderr + run.stdout
    assert not (root / "models" / "model.pt").exists()
