"""Inference over a folder checks every input first (bundle/data/checks.py): ``--on_bad_input stop`` names every
bad file in the last line and computes nothing; ``skip`` infers the good ones and reports the rest.

Real files in their real format: small synthetic MSD volumes, a truncated ``.nii.gz``, a 4-D volume, an all-NaN
volume and a text file with a volume's name; the shipped Hippocampus cDAL model (2 generations) serves them.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from bundle.data.checks import SKIP_REPORT
from bundle.data.hippocampus import write_synthetic_hippocampus

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/inference.yaml", "configs/datasets/hippocampus.yaml"]
BAD = {
    "allnan.nii.gz": "holds ",
    "fourd.nii.gz": "has 2 channels after loading (shape (2, ",
    "text.nii.gz": "not a readable NIfTI volume (",
    "truncated.nii.gz": "not a readable NIfTI volume (EOFError",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    msd = write_synthetic_hippocampus(root / "msd", num_cases=2, shape=(12, 16, 15), seed=3)
    inputs = root / "inputs"
    inputs.mkdir()
    good = sorted((msd / "imagesTr").glob("*.nii.gz"))
    for path in good:
        (inputs / path.name).write_bytes(path.read_bytes())
    volume = nib.load(good[0])
    data = np.asarray(volume.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), volume.affine), inputs / "fourd.nii.gz")
    nib.save(nib.Nifti1Image(np.full_like(data, np.nan), volume.affine), inputs / "allnan.nii.gz")
    whole = good[1].read_bytes()
    (inputs / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])  # a download cut short
    (inputs / "text.nii.gz").write_text("not a volume\n")
    return inputs, [p.name for p in good]


def test_stop_names_every_bad_file_in_the_last_line_and_computes_nothing(folder, tmp_path):
    inputs, _ = folder
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIGS), "--input_dir", str(inputs),
         "--output_dir", str(out), "--num_generations", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {inputs}: 4 of 6 inputs cannot be inferred: "), last
    for name, problem in BAD.items():
        assert f"{inputs / name}: {problem}" in last, name
    assert "non-finite (NaN or inf) values" in last and "this model takes 1" in last
    assert "nothing was computed" in last
    assert not out.exists() or not any(out.rglob("*.nii.gz"))


def test_skip_infers_the_good_files_and_reports_the_others(folder, tmp_path):
    inputs, good = folder
    out = tmp_path / "out"
    parser = ConfigParser()
    parser.read_config([str(REPO / c) for c in CONFIGS])
    parser.update(
        {"bundle_root": str(tmp_path / "bundle"), "input_dir": str(inputs), "output_dir": str(out),
         "num_generations": 2, "on_bad_input": "skip"}
    )  # fmt: skip
    parser.get_parsed_content("run")
    written = sorted(p.name for p in (out / "masks").glob("*.nii.gz"))
    assert written == good
    for name in good:  # each label volume in its input's grid
        assert nib.load(out / "masks" / name).shape == nib.load(inputs / name).shape
    with open(out / SKIP_REPORT) as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["file"] for r in rows) == sorted(str(inputs / n) for n in BAD)
    for row in rows:
        assert row["problem"].startswith(BAD[Path(row["file"]).name])
