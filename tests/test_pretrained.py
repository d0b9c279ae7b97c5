"""The shipped Hippocampus models (pretrained/hippocampus_cdal, 2-D; pretrained/hippocampus_cdal_3d, 3-D): the
documented inference commands serve them on a bundle without a trained model of its own, and they segment a real
volume they never saw in training.

``hippocampus_001`` is in fold 0, the fold the shipped model was not trained on (nor selected on).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "pretrained" / "hippocampus_cdal"
SHIPPED_3D = REPO / "pretrained" / "hippocampus_cdal_3d"
PROFILE_3D = "configs/profiles/cdal_hippocampus_3d.yaml"
METHOD = "configs/methods/cdal.yaml"  # named: the 3-D profile changes two of its network settings
CASE = "hippocampus_001"


def test_shipped_weights_are_small_and_load_into_the_default_cdal():
    from monai.bundle import ConfigParser

    weights = SHIPPED / "model.pt"
    assert weights.is_file() and weights.stat().st_size < 25 * 2**20
    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / f) for f in ("inference.yaml", "datasets/hippocampus.yaml")])
    parser["bundle_root"] = "/nonexistent"  # a bundle without models/model.pt of its own
    assert Path(parser.get_parsed_content("checkpoint")) == weights
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    card = json.loads((SHIPPED / "export.json").read_text())
    assert card["dataset"] == "hippocampus"


def test_the_3d_weights_load_into_the_3d_profile_after_the_dataset_overlay():
    from monai.bundle import ConfigParser

    weights = SHIPPED_3D / "model.pt"
    assert weights.is_file() and weights.stat().st_size < 25 * 2**20
    parser = ConfigParser()
    parser.read_config(
        [str(REPO / f) for f in ("configs/inference.yaml", METHOD, "configs/datasets/hippocampus.yaml", PROFILE_3D)]
    )
    parser["bundle_root"] = "/nonexistent"
    assert Path(parser.get_parsed_content("checkpoint")) == weights
    assert parser.get_parsed_content("spatial_dims") == 3 and parser.get_parsed_content("slice_axis") is None
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)


def _segment(shared_data_dir, tmp_path, extra_configs=(), expected_weights="hippocampus_cdal"):
    root = shared_data_dir / "hippocampus" / "Task04_Hippocampus"
    inputs, out = tmp_path / "volumes", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(root / "imagesTr" / f"{CASE}.nii.gz", inputs / f"{CASE}.nii.gz")
    configs = ["configs/inference.yaml", *extra_configs[:1], "configs/datasets/hippocampus.yaml", *extra_configs[1:]]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs)]
    command += ["--input_dir", str(inputs), "--output_dir", str(out), "--bundle_root", str(tmp_path / "bundle")]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "serving the shipped cdal weights" in proc.stderr + proc.stdout
    assert f"{expected_weights}/model.pt" in proc.stderr + proc.stdout
    written = sorted(p.name for p in (out / "masks").iterdir())
    assert written == [f"{CASE}.nii.gz"]
    mask = nib.load(out / "masks" / f"{CASE}.nii.gz")
    source, label = nib.load(inputs / f"{CASE}.nii.gz"), nib.load(root / "labelsTr" / f"{CASE}.nii.gz")
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    predicted, truth = np.asarray(mask.dataobj), np.asarray(label.dataobj)
    return [2 * np.sum((predicted == c) & (truth == c)) / (np.sum(predicted == c) + np.sum(truth == c)) for c in (1, 2)]


@pytest.mark.realdata
def test_documented_command_segments_an_unseen_real_volume(shared_data_dir, tmp_path):
    dice = _segment(shared_data_dir, tmp_path)
    assert min(dice) > 0.80, dice  # measured: see pretrained/hippocampus_cdal/README.md


@pytest.mark.realdata
def test_the_3d_model_segments_an_unseen_real_volume(shared_data_dir, tmp_path):
    dice = _segment(shared_data_dir, tmp_path, [METHOD, PROFILE_3D], "hippocampus_cdal_3d")
    assert min(dice) > 0.82, (
        dice
    )  # measured 0.881 / 0.849 (fold 0 evaluation): pretrained/hippocampus_cdal_3d/README.md


def test_shipped_model_exports_for_monai_label(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("export", REPO / "tools" / "export_monailabel_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.export_shipped(tmp_path) == ["hippocampus_cdal", "hippocampus_cdal_3d"]
    for name, slice_wise in (("hippocampus_cdal", True), ("hippocampus_cdal_3d", False)):
        bundle = tmp_path / name
        metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
        assert metadata["monailabel"]["dimension"] == 3 and metadata["monailabel"]["slice_wise"] is slice_wise
        assert (bundle / "models" / "model.pt").read_bytes() != b""
    assert module.export_shipped(tmp_path) == []  # an existing bundle of that name is kept
