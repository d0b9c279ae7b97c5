"""The shipped Hippocampus model (pretrained/hippocampus_cdal): the documented inference command serves it on a
bundle without a trained model of its own, and it segments a real volume it never saw in training.

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


@pytest.mark.realdata
def test_documented_command_segments_an_unseen_real_volume(shared_data_dir, tmp_path):
    root = shared_data_dir / "hippocampus" / "Task04_Hippocampus"
    inputs, out = tmp_path / "volumes", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(root / "imagesTr" / f"{CASE}.nii.gz", inputs / f"{CASE}.nii.gz")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    command += ["['configs/inference.yaml','configs/datasets/hippocampus.yaml']"]
    command += ["--input_dir", str(inputs), "--output_dir", str(out), "--bundle_root", str(tmp_path / "bundle")]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "serving the shipped cdal weights" in proc.stderr + proc.stdout
    written = sorted(p.name for p in (out / "masks").iterdir())
    assert written == [f"{CASE}.nii.gz"]
    mask = nib.load(out / "masks" / f"{CASE}.nii.gz")
    source, label = nib.load(inputs / f"{CASE}.nii.gz"), nib.load(root / "labelsTr" / f"{CASE}.nii.gz")
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    predicted, truth = np.asarray(mask.dataobj), np.asarray(label.dataobj)
    dice = [2 * np.sum((predicted == c) & (truth == c)) / (np.sum(predicted == c) + np.sum(truth == c)) for c in (1, 2)]
    assert min(dice) > 0.80, dice  # measured: see pretrained/hippocampus_cdal/README.md


def test_shipped_model_exports_for_monai_label(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("export", REPO / "scripts" / "export_monailabel_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.export_shipped(tmp_path) == ["hippocampus_cdal"]
    bundle = tmp_path / "hippocampus_cdal"
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["monailabel"]["dimension"] == 3
    assert (bundle / "models" / "model.pt").read_bytes() != b""
    assert module.export_shipped(tmp_path) == []  # an existing bundle of that name is kept
