"""Every method x dataset cell through training, evaluation and inference, for real, on tiny data the project writes.

One module fixture runs the 25 cells' three workflows in this process (tiny networks, two iterations, one
validation; tests/workflow_matrix.py) and records what each run did; the tests then check the outputs of each cell:
checkpoints in the method-neutral layout, the method's loss keys and the validation metrics in its MLflow run, the
evaluation report of the held-out subset, and inference outputs with the inputs' names, shapes and value ranges.
Marked ``matrix`` (part of the default run; about two minutes on a 2-core CPU).
"""

from __future__ import annotations

import csv
import json
import logging
import sqlite3
import time
import traceback
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from workflow_matrix import DATASETS, METHODS, run_cell, write_tiny_data

pytestmark = pytest.mark.matrix
WORKFLOW_ORDER = ("training", "evaluating", "inference")
LOSS_KEYS = {
    "cdal": {"loss_g", "loss_d", "loss_d_real", "loss_d_fake", "r1"},
    "segdiff": {"loss"},
    "unet": {"loss"},
    "prob_unet": {"loss", "loss_rec", "loss_kl"},
    "mose": {"loss", "loss_seg", "loss_kl"},
}
TEST_IMAGES = {"synthetic": 2, "monuseg": 2, "cxr": 3, "hippocampus": 2, "lidc": 2}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    data = write_tiny_data(root / "data")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    results = {}
    start = time.time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for dataset in DATASETS:
                for method in METHODS:
                    cell_root = root / f"{method}_{dataset}"
                    for workflow in WORKFLOW_ORDER:
                        try:
                            run_cell(workflow, method, dataset, cell_root, data[dataset])
                            results[(method, dataset, workflow)] = None
                        except Exception:  # noqa: BLE001 - reported by the cell's test
                            results[(method, dataset, workflow)] = traceback.format_exc()[-4000:]
    finally:
        logging.disable(logging.NOTSET)
        torch.set_num_threads(threads)
    print(f"\n{len(results)} workflow runs in {time.time() - start:.0f} s")
    return {"root": root, "data": data, "results": results}


def _check_ran(matrix, method, dataset, workflow):
    error = matrix["results"][(method, dataset, workflow)]
    assert error is None, f"{workflow} of {method} on {dataset} failed:\n{error}"


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_training_cell(matrix, method, dataset):
    _check_ran(matrix, method, dataset, "training")
    cell = matrix["root"] / f"{method}_{dataset}"
    last = torch.load(cell / "models" / "checkpoints" / "last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 2
    assert {"networks", "optimizers", "lr_schedulers", "trainer", "checkpointer"} <= set(last)
    main = "generator" if method == "cdal" else "network"
    model = torch.load(cell / "models" / "model.pt", weights_only=True)
    # model.pt (saved at the one validation) is the served network: SegDiff's EMA, the trained network otherwise
    served = last["ema_network"] if method == "segdiff" else last["networks"][main]
    assert model.keys() == served.keys()
    for key, value in model.items():
        torch.testing.assert_close(value, served[key], rtol=0, atol=0)
    with sqlite3.connect(cell / "mlruns.db") as db:
        runs = db.execute("select run_uuid, status from runs").fetchall()
        assert len(runs) == 2  # one training run, one evaluation run
        train_id = db.execute("select run_uuid from runs where name not like 'eval_%'").fetchone()[0]
        keys = {k for (k,) in db.execute(f"select distinct key from metrics where run_uuid = '{train_id}'")}
        dice = db.execute(f"select value from metrics where run_uuid = '{train_id}' and key = 'val_dice'").fetchall()
        params = dict(db.execute(f"select key, value from params where run_uuid = '{train_id}'").fetchall())
    assert LOSS_KEYS[method] <= keys, f"losses missing from MLflow: {LOSS_KEYS[method] - keys}"
    assert len(dice) == 1 and 0.0 <= dice[0][0] <= 1.0
    assert params["method"] == method and params["dataset"] == dataset


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_evaluation_cell(matrix, method, dataset):
    _check_ran(matrix, method, dataset, "evaluating")
    out = matrix["root"] / f"{method}_{dataset}" / "eval" / f"evaluation_{dataset}_test"
    summary = json.loads((out / "metrics_summary.json").read_text())
    rows = list(csv.DictReader(open(out / "metrics_per_image.csv")))
    assert summary["num_images"] == len(rows) == TEST_IMAGES[dataset]
    if dataset == "hippocampus":  # per volume and class; NIfTI predictions in the inputs' grids
        assert {"dice_anterior", "dice_posterior", "dice_mean"} <= set(summary["metrics"])
        assert "wcov" not in summary["metrics"]
        for row in rows:
            written = nib.load(out / "predictions" / Path(row["image"]).name)
            assert written.shape == nib.load(row["image"]).shape
            assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2}
    else:
        assert {"dice", "iou", "precision", "recall", "wcov", "boundary_f", "calibration"} <= set(summary["metrics"])
    values = [float(v) for row in rows for k, v in row.items() if k != "image" and v not in ("", "nan")]
    assert values and all(0.0 <= v <= 1.0 for v in values)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_inference_cell(matrix, method, dataset):
    _check_ran(matrix, method, dataset, "inference")
    out = matrix["root"] / f"{method}_{dataset}" / "inference"
    suffixes = (".nii.gz",) if dataset == "hippocampus" else (".tif", ".png", ".jpg")
    inputs = sorted(p for p in Path(matrix["data"][dataset]["input_dir"]).iterdir() if p.name.endswith(suffixes))
    assert inputs
    for path in inputs:
        if dataset == "hippocampus":
            stem = path.name[: -len(".nii.gz")]
            mask, unc = nib.load(out / "masks" / f"{stem}.nii.gz"), nib.load(out / "uncertainty" / f"{stem}.nii.gz")
            source = nib.load(path)
            assert mask.shape == unc.shape == source.shape
            assert np.allclose(mask.affine, source.affine) and mask.get_data_dtype() == np.uint8
            assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1, 2}
            u = np.asarray(unc.dataobj)
            assert unc.get_data_dtype() == np.float32 and 0.0 <= u.min() and u.max() <= 0.5
        else:
            size = Image.open(path).size
            mask = np.array(Image.open(out / "masks" / f"{path.stem}.png"))
            unc = Image.open(out / "uncertainty" / f"{path.stem}.png")
            assert mask.shape == (size[1], size[0]) and unc.size == size
            assert set(np.unique(mask).tolist()) <= {0, 1}


def test_distribution_evaluation_of_the_lidc_models(matrix):
    """evaluate_distribution.yaml on the matrix's LIDC models: MoSE (weighted form) and the U-Net."""
    for method, extra in (("mose", {"mose_eval_mode": "weighted"}), ("unet", {})):
        cell = matrix["root"] / f"{method}_lidc"
        run_cell(
            "evaluating",
            method,
            "lidc",
            cell,
            matrix["data"]["lidc"],
            extra={**extra, "eval_subset": "validation"},
            workflow_files=("evaluate_distribution.yaml",),
        )
        report = json.loads((cell / "eval" / "evaluation_lidc_validation" / "distribution_metrics.json").read_text())
        assert report["settings"]["num_generations"] == 100
        metrics = report["metrics"]
        for name in ("ged_16", "ged_100", "hm_iou_16", "dice"):
            assert metrics[name]["n"] == report["num_images"] >= 1, (method, name)
        assert 0.0 <= metrics["ged_16"]["mean"] <= 2.0 and 0.0 <= metrics["hm_iou_16"]["mean"] <= 1.0
        assert 0.0 <= metrics["ece_16"]["value"] <= 1.0
