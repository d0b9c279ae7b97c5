"""Reproduction workflow: short real runs of the bundle on synthetic chest X-rays -> paper tables with a t-test.

Two folds of cDAL are trained (a few iterations on 32x32 images) and each is evaluated twice on its held-out fold:
with 3 generations ("cdal") and with 1 ("cdal_n1"), i.e. two methods x two folds in the folder layout that
``scripts/reproduce.py`` writes. The bundle workflows run in-process through ``monai.bundle.run`` (the same code
path as ``python -m monai.bundle run``, without six interpreter start-ups); ``scripts/reproduce.py`` (its ``main``,
called in-process) then reads the finished runs as a user would and writes the Markdown, CSV and LaTeX tables.
"""

from __future__ import annotations

import csv
import importlib.util
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import run as bundle_run
from scipy.stats import ttest_rel

from bundle.data.cxr import write_synthetic_cxr
from bundle.reports.tables import build_table, format_latex, format_markdown, read_run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = {"image_size": 32, "patch_size": 32, "batch_size": 2, "num_timesteps": 2}


def _reproduce(argv: list[str], capsys) -> str:
    """Run ``scripts/reproduce.py`` with ``argv``; its standard output."""
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(argv) == 0
    return capsys.readouterr().out


def _configs(*names: str) -> list[str]:
    return [str(CONFIGS / n) for n in names]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("reproduce")
    data = write_synthetic_cxr(base / "cxr", "kaggle", num_shenzhen=6, num_montgomery=3, size=48, seed=2)
    results = base / "results"
    tracking = f"sqlite:///{results / 'mlruns.db'}"
    common = {"dataset_dir": str(data), "tracking_uri": tracking, **TINY}
    for fold in (0, 1):
        trained = results / "cdal" / "cxr" / f"fold{fold}"
        bundle_run(
            run_id="training",
            config_file=_configs("train.yaml", "methods/cdal.yaml", "datasets/cxr.yaml"),
            bundle_root=str(trained),
            fold=fold,
            max_epochs=2,
            epoch_length=3,
            val_interval=2,
            lr_g=1.0e-3,
            num_generations=1,
            **common,
        )
        for method, generations in (("cdal", 3), ("cdal_n1", 1)):
            root = results / method / "cxr" / f"fold{fold}"
            bundle_run(
                run_id="evaluating",
                config_file=_configs("train.yaml", "evaluate.yaml", "methods/cdal.yaml", "datasets/cxr.yaml"),
                bundle_root=str(root),
                fold=fold,
                eval_subset="test",
                eval_dir=str(root / "evaluation"),
                checkpoint=str(trained / "models" / "model.pt"),
                num_generations=generations,
                **common,
            )
    return results


def _column(path: Path, name: str) -> dict[str, float]:
    with open(path, newline="") as f:
        return {Path(r["image"]).name: float(r[name]) for r in csv.DictReader(f)}


def test_reproduce_writes_three_formats_with_the_t_test(results, capsys):
    printed = _reproduce(
        [
            "--methods",
            "cdal",
            "cdal_n1",
            "--dataset",
            "cxr",
            "--folds",
            "0",
            "1",
            "--results",
            str(results),
            "--tabulate_only",
        ],
        capsys,
    )
    assert "reading the finished run" in printed and "| Method | Dice |" in printed
    out = results / "tables" / "cxr_cdal_vs_cdal_n1"
    markdown, latex = (out / "table.md").read_text(), (out / "table.tex").read_text()
    with open(out / "table.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}

    # the paired t-test over the images of both folds, recomputed from the per-image files
    a, b = [], []
    for fold in (0, 1):
        dice_a = _column(results / "cdal" / "cxr" / f"fold{fold}" / "evaluation" / "metrics_per_image.csv", "dice")
        dice_b = _column(results / "cdal_n1" / "cxr" / f"fold{fold}" / "evaluation" / "metrics_per_image.csv", "dice")
        assert sorted(dice_a) == sorted(dice_b) and len(dice_a) == 3  # 9 pairs in 3 folds: 3 held out per fold
        a += [dice_a[k] for k in sorted(dice_a)]
        b += [dice_b[k] for k in sorted(dice_a)]
    expected_p = ttest_rel(b, a).pvalue
    assert np.isfinite(expected_p)
    assert float(rows["cdal_n1"]["dice_p"]) == pytest.approx(expected_p, rel=1e-4)
    assert rows["cdal"]["dice_p"] == "" and rows["cdal_n1"]["compared_with"] == "cdal"

    # mean +- std over folds of the per-fold means
    fold_means = [np.mean(a[:3]), np.mean(a[3:])]
    assert float(rows["cdal"]["dice_mean"]) == pytest.approx(np.mean(fold_means), abs=1e-6)
    assert float(rows["cdal"]["dice_std"]) == pytest.approx(np.std(fold_means, ddof=1), abs=1e-6)
    cell = f"{np.mean(fold_means):.3f} ± {np.std(fold_means, ddof=1):.3f}"
    assert f"| cdal | {cell} |" in markdown
    assert f"${np.mean(fold_means):.3f} \\pm {np.std(fold_means, ddof=1):.3f}$" in latex
    assert "\\begin{tabular}" in latex and "cdal\\_n1 vs cdal" in latex
    assert "| cdal_n1 − cdal | Dice |" in markdown and "paired over the images of all folds" in markdown

    # the table is an MLflow run next to the training and evaluation runs
    with sqlite3.connect(results / "mlruns.db") as db:
        names = [r[0] for r in db.execute("select name from runs")]
        p_logged = db.execute("select value from metrics where key = 'p/cdal_n1_vs_cdal/dice'").fetchall()
    assert "table_cxr_cdal_vs_cdal_n1" in names and len(names) >= 7
    assert p_logged and p_logged[0][0] == pytest.approx(expected_p, rel=1e-4)


def test_fold_pairing_and_mismatched_runs(results):
    runs = [read_run(results / m / "cxr" / f"fold{k}", m, k) for m in ("cdal", "cdal_n1") for k in (0, 1)]
    by_fold = build_table(runs, "cxr", metrics=("dice", "recall"), pairing="fold")
    test = next(t for t in by_fold.tests if t.column == "dice")
    assert test.n == 2 and test.pairing == "fold"
    assert "Recall" in format_markdown(by_fold) and "Recall" in format_latex(by_fold)
    with pytest.raises(ValueError, match="folds"):
        build_table(runs[:3], "cxr")  # cdal_n1 lacks fold 1


def test_dry_run_composes_the_bundle_commands(tmp_path, capsys):
    printed = _reproduce(
        [
            "--methods",
            "cdal",
            "--dataset",
            "hippocampus",
            "--folds",
            "2",
            "--results",
            str(tmp_path),
            "--paper",
            "--dataset_dir",
            "/data/Task04",
            "--dry_run",
            "--set",
            "max_epochs=5",
            "--eval_set",
            "num_generations=5",
        ],
        capsys,
    )
    train, evaluate = [line for line in printed.splitlines() if line.startswith("$ ")]
    assert "run training" in train and "evaluate.yaml" not in train and "--fold 2" in train
    order = ["train.yaml", "methods/cdal.yaml", "datasets/hippocampus.yaml", "paper/cdal_hippocampus.yaml"]
    positions = [train.index(name) for name in order]
    assert positions == sorted(positions) and "--max_epochs 5" in train and "num_generations" not in train
    assert "run evaluating" in evaluate and evaluate.index("evaluate.yaml") < evaluate.index("methods/cdal.yaml")
    assert f"--eval_dir {tmp_path}/cdal/hippocampus/fold2/evaluation" in evaluate and "--num_generations 5" in evaluate
