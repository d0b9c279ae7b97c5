"""The bundle's workflows through the real CLI (`python -m monai.bundle run ...`) on synthetic data.

One short cDAL training run is shared by the tests of this module (learning, MLflow, resume, evaluation,
inference). The run is short, so the learning threshold is "clearly better than the trivial guesses on the same
validation images", not the main job's Dice.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bundle import composer
from bundle.data.monuseg import build_monuseg_datalist
from bundle.transforms.io import LoadInstanceMaskd, LoadTiled

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SMALL_DATA = "$bundle.data.synthetic.ensure_synthetic_monuseg(@dataset_dir, num_train=12, num_test=3, size=256, seed=0)"
EVAL_ARGS = ["--dataset_root", SMALL_DATA, "--num_generations", "3", "--eval_subset", "test"]
SHORT = [
    "--dataset_root",
    SMALL_DATA,
    "--epoch_length",
    "8",
    "--max_epochs",
    "2",
    "--val_interval",
    "1",
    "--num_generations",
    "3",
    "--batch_size",
    "6",
]


def run_bundle(run_id: str, configs: list[str], root: Path, *args: str, check: bool = True):
    overrides = {"bundle_root": root, "dataset_dir": root.parent / "data"}
    cmd = composer.bundle_command(run_id, [CONFIGS / c for c in configs], overrides) + list(args)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=composer.BUNDLE_ROOT, capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    run_bundle("training", ["train.yaml"], root, *SHORT)
    return root


def _trivial_dice(root: Path) -> float:
    """Best of all-foreground / all-background Dice on the validation images, per-image mean at 128x128."""
    datalist = json.loads(next((root / "eval").glob("datalist_*.json")).read_text())
    scores = []
    for item in datalist["validation"]:
        d = LoadInstanceMaskd(keys="label", image_key="image")(LoadTiled(keys="image")(dict(item)))
        label = torch.nn.functional.interpolate(d["label"][None].float(), size=(128, 128), mode="nearest") > 0
        p = float(label.float().mean())
        scores.append(2 * p / (1 + p))
    return float(np.mean(scores))


def _mlflow_rows(root: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(root / "mlruns.db") as db:
        return db.execute(sql).fetchall()


def test_short_training_learns_and_saves(trained):
    assert (trained / "models" / "model.pt").is_file()
    assert (trained / "models" / "checkpoints" / "last.pt").is_file()
    state = torch.load(trained / "models" / "checkpoints" / "last.pt", weights_only=True)
    best = state["checkpointer"]["best_metric"]
    baseline = _trivial_dice(trained)
    print(f"validation Dice after 16 iterations: {best:.3f}; all-foreground guess: {baseline:.3f}")
    assert best > baseline + 0.15
    weights = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("head") or "encoder" in k for k in weights)


def test_mlflow_run_has_params_metrics_and_artifacts(trained):
    runs = _mlflow_rows(trained, "select run_uuid, name, status, artifact_uri from runs")
    assert len(runs) == 1
    run_id, name, status, artifact_uri = runs[0]
    assert name.startswith("cdal_synthetic_") and status == "FINISHED"
    params = dict(_mlflow_rows(trained, f"select key, value from params where run_uuid = '{run_id}'"))
    for key, value in {
        "method": "cdal",
        "dataset": "synthetic",
        "num_timesteps": "4",
        "num_generations": "3",
        "batch_size": "6",
        "seed": "1024",
        "image_size": "128",
        "lr_g": "0.0002",
    }.items():
        assert params[key] == value
    # eval_amp auto: the precision the validation ran at, named by what this machine's hardware gives
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert params["eval_precision"] == ("bfloat16" if native else "float32")
    metrics = {k for (k,) in _mlflow_rows(trained, f"select distinct key from metrics where run_uuid = '{run_id}'")}
    assert {"loss_g", "loss_d", "val_dice", "val_iou"} <= metrics
    artifacts = Path(artifact_uri.removeprefix("file://"))
    names = {p.name for p in artifacts.rglob("*") if p.is_file()}
    assert {"model.pt", "last.pt"} <= names
    panels = list(artifacts.rglob("*.png"))
    assert panels and Image.open(panels[0]).size[0] == 4 * 128


def test_resume_restores_epoch_and_optimizer_state(trained, tmp_path):
    saved = torch.load(trained / "models" / "checkpoints" / "last.pt", weights_only=True)
    # ignite keeps the iteration (and epoch_length) in its state dict; 16 iterations of 8 = epoch 2
    assert saved["trainer"]["iteration"] == 16 and saved["trainer"]["epoch_length"] == 8
    steps = [s["step"] for s in saved["optimizers"]["generator"]["state"].values()]
    assert steps and all(float(s) == 16 for s in steps)
    # a new run over existing checkpoints is refused, naming the file
    refused = run_bundle("training", ["train.yaml"], trained, *SHORT, check=False)
    assert refused.returncode != 0
    assert "model.pt: a checkpoint from an earlier run exists" in refused.stderr and "--resume" in refused.stderr
    # resuming to epoch 3 runs exactly one more epoch, continuing the optimizer's step count
    run_bundle(
        "training",
        ["train.yaml"],
        trained,
        *SHORT[:-6],
        "--max_epochs",
        "3",
        "--val_interval",
        "1",
        "--num_generations",
        "3",
        "--batch_size",
        "6",
        "--resume",
        "true",
    )
    resumed = torch.load(trained / "models" / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["trainer"]["iteration"] == 24 and resumed["trainer"]["max_epochs"] == 3
    steps = [s["step"] for s in resumed["optimizers"]["generator"]["state"].values()]
    assert all(float(s) == 24 for s in steps)
    assert resumed["checkpointer"]["best_metric"] >= saved["checkpointer"]["best_metric"]


def test_evaluation_writes_per_image_csv_and_summary(trained):
    run_bundle("evaluating", ["train.yaml", "evaluate.yaml"], trained, *EVAL_ARGS)
    out = trained / "eval" / "evaluation_synthetic_test"
    rows = list(csv.DictReader(open(out / "metrics_per_image.csv")))
    assert [Path(r["image"]).name for r in rows] == [f"synth_test_{i:03d}.tif" for i in range(3)]
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["num_images"] == 3
    dice = [float(r["dice"]) for r in rows]
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(np.mean(dice), abs=1e-6)
    assert all(0.0 <= float(r[m]) <= 1.0 for r in rows for m in ("dice", "iou", "precision", "recall"))
    assert summary["metrics"]["dice"]["mean"] > 0.3
    # the test subset was never used for model selection: it is disjoint from training and validation
    datalist = json.loads(next((trained / "eval").glob("datalist_*.json")).read_text())
    seen = {d["image"] for d in datalist["training"] + datalist["validation"]}
    assert not seen & {d["image"] for d in datalist["test"]}
    # results are not silently replaced
    again = run_bundle("evaluating", ["train.yaml", "evaluate.yaml"], trained, *EVAL_ARGS, check=False)
    assert again.returncode != 0 and "metrics_per_image.csv" in again.stderr


def test_inference_writes_masks_and_uncertainty_with_input_names(trained, tmp_path):
    inputs = trained.parent / "data" / "MoNuSegTestData"
    out = tmp_path / "predictions"
    run_bundle(
        "run",
        ["inference.yaml"],
        trained,
        "--input_dir",
        str(inputs),
        "--output_dir",
        str(out),
        "--num_generations",
        "3",
    )
    stems = sorted(p.stem for p in inputs.glob("*.tif"))
    assert sorted(p.stem for p in (out / "masks").glob("*.png")) == stems
    assert sorted(p.stem for p in (out / "uncertainty").glob("*.png")) == stems
    mask = np.array(Image.open(out / "masks" / f"{stems[0]}.png"))
    assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 1} and mask.any()
    # the masks are predictions of the trained model: they overlap the ground truth of each tile
    for item in build_monuseg_datalist(inputs.parent)["test"]:
        truth = LoadInstanceMaskd(keys="label", image_key="image")(LoadTiled(keys="image")(dict(item)))["label"]
        pred = np.array(Image.open(out / "masks" / f"{Path(item['image']).stem}.png")) > 0
        truth = truth[0].numpy() > 0
        assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.3
    # an existing result is never overwritten
    again = run_bundle(
        "run",
        ["inference.yaml"],
        trained,
        "--input_dir",
        str(inputs),
        "--output_dir",
        str(out),
        "--num_generations",
        "3",
        check=False,
    )
    assert again.returncode != 0
    last = again.stderr.strip().splitlines()[-1]  # the refusal is the last line, naming the file
    assert last.startswith(f"error: {out}") and "exists already; pass '--overwrite true'" in last, last
