"""The same train and evaluate workflows serve every method on LIDC by switching the method overlay.

One Python process (the bundle runner ``monai.bundle.run``, what the CLI calls) trains the U-Net, the Probabilistic
U-Net, MoSE and cDAL for two iterations each on synthetic LIDC crops with their overlay and
``configs/datasets/lidc.yaml`` (tiny networks, one validation with GED / HM-IoU), then evaluates MoSE (weighted
form, 100 samples) with ``configs/evaluate_distribution.yaml``. Learning itself is tested in test_prob_unet.py and
test_mose.py; the smoke numbers on the real crops are in docs/results_lidc.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bundle.data.lidc_synthetic import ensure_synthetic_lidc

REPO = Path(__file__).resolve().parents[1]

RUNNER = textwrap.dedent(
    """
    import json, sys
    import torch
    from monai.bundle import run

    torch.set_num_threads(1)
    repo, root, data = sys.argv[1:4]
    common = dict(bundle_root=root, dataset_dir=data, max_epochs=1, epoch_length=2, val_interval=1, batch_size=2)
    tiny = {
        "unet": {"network_def#channels": [8, 16, 32], "network_def#strides": [2, 2]},
        "prob_unet": {"network_def#num_channels": [8, 16], "num_generations": 4},
        "mose": {"network_def#num_channels": [8, 16], "num_generations": 4},
        "cdal": {"network_def#num_channels": 8, "network_def#z_emb_dim": 16, "network_def#nz": 8,
                 "discriminator_def#ngf": 4, "num_generations": 2},
    }
    for method, extra in tiny.items():
        configs = [f"{repo}/configs/{c}" for c in ("train.yaml", f"methods/{method}.yaml", "datasets/lidc.yaml")]
        run("training", config_file=configs, ckpt_dir=f"{root}/models_{method}", output_dir=f"{root}/eval_{method}",
            **common, **extra)
    configs = [f"{repo}/configs/{c}" for c in ("train.yaml", "methods/mose.yaml", "datasets/lidc.yaml",
                                               "evaluate.yaml", "evaluate_distribution.yaml")]
    run("evaluating", config_file=configs, ckpt_dir=f"{root}/models_mose", output_dir=f"{root}/eval_mose",
        bundle_root=root, dataset_dir=data, mose_eval_mode="weighted", **{"network_def#num_channels": [8, 16]})
    """
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("lidc_workflows")
    data = ensure_synthetic_lidc(base / "data", num_train=6, num_test=2, size=64)
    root = base / "bundle"
    root.mkdir()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(REPO), str(root), str(data)], cwd=root,
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"LIDC workflows failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return root


@pytest.mark.parametrize("method", ["unet", "prob_unet", "mose", "cdal"])
def test_training_on_lidc_with_every_method_overlay(runs, method):
    models = runs / f"models_{method}"
    state = torch.load(models / "checkpoints" / "last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 2
    assert ("generator" if method == "cdal" else "network") in state
    weights = torch.load(models / "model.pt", weights_only=True)
    assert weights, f"{method}: empty model.pt"
    datalist = json.loads((runs / f"eval_{method}" / "datalist_lidc.json").read_text())
    assert {k: len(v) for k, v in datalist.items()} == {"training": 5, "validation": 1, "test": 2}
    assert (runs / f"eval_{method}" / "panels" / "validation_epoch_0001.png").is_file()


def test_distribution_evaluation_of_mose(runs):
    report = json.loads((runs / "eval_mose" / "evaluation_lidc_test" / "distribution_metrics.json").read_text())
    assert report["num_images"] == 2 and report["settings"]["num_generations"] == 100
    metrics = report["metrics"]
    for name in ("ged_16", "ged_100", "hm_iou_16", "dice"):
        assert metrics[name]["n"] == 2, name
    assert 0.0 <= metrics["ged_16"]["mean"] <= 2.0 and 0.0 <= metrics["ged_100"]["mean"] <= 2.0
    assert 0.0 <= metrics["hm_iou_16"]["mean"] <= 1.0
    ece = metrics["ece_16"]["value"]
    assert metrics["ece_16"]["pooled"] and 0.0 <= ece <= 1.0 and math.isfinite(ece)
    per_image = (runs / "eval_mose" / "evaluation_lidc_test" / "distribution_per_image.csv").read_text().splitlines()
    assert per_image[0] == "image,dice,ged_16,ged_100,hm_iou_16" and len(per_image) == 3
