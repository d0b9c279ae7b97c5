"""Reproduction workflow: short real runs of the bundle on synthetic chest X-rays -> paper tables with a t-test.

Two folds of cDAL are trained (a few iterations on 32x32 images) and each is evaluated twice on its held-out fold:
with 3 generations ("cdal") and with 1 ("cdal_n1"), i.e. two methods x two folds in the folder layout that
``tools/reproduce.py`` writes. The bundle workflows run in-process through ``monai.bundle.run`` (the same code
path as ``python -m monai.bundle run``, without six interpreter start-ups); ``tools/reproduce.py`` (its ``main``,
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
    """Run ``tools/reproduce.py`` with ``argv``; its standard output."""
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "tools" / "reproduce.py")
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


def test_spread_over_images_and_timing_columns(results):
    runs = [read_run(results / m / "cxr" / f"fold{k}", m, k) for m in ("cdal", "cdal_n1") for k in (0, 1)]
    timings = {"cdal": {"train_minutes": 12.5, "seconds_per_image": 3.25}, "cdal_n1": {"train_minutes": 12.5}}
    table = build_table(runs, "cxr", metrics=("dice",), spread="images", timings=timings)
    pooled = np.concatenate([r.scores["dice"] for r in runs[:2]])
    cell = table.cells[("cdal", "dice")]
    assert cell.mean == pytest.approx(pooled.mean()) and cell.std == pytest.approx(np.std(pooled, ddof=1))
    markdown, latex = format_markdown(table), format_latex(table)
    assert "over the images (volumes) of folds 0, 1" in markdown
    assert "| Method | Dice | Train (min) | s / image |" in markdown
    assert f"| cdal | {pooled.mean():.3f} ± {np.std(pooled, ddof=1):.3f} | 12.5 | 3.25 |" in markdown
    assert "| cdal_n1 |" in markdown and markdown.split("| cdal_n1 |")[1].split("\n")[0].endswith("| 12.5 | - |")
    assert "Train (min) & s / image" in latex
    with pytest.raises(ValueError, match="spread"):
        build_table(runs, "cxr", spread="volumes")


def test_engine_minutes_reads_the_bundle_log(tmp_path):
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "tools" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    log = tmp_path / "training.log"
    log.write_text(
        "2026-11-29 10:00:00,000 - ignite.engine.engine.SupervisedEvaluator - INFO - Engine run finished. "
        "Time taken: 00:00:30.000\n"
        "2026-11-29 10:10:00,000 - ignite.engine.engine.SegmentationTrainer - INFO - Engine run finished. "
        "Time taken: 01:02:30.600\n"
    )
    assert module.engine_minutes(log, "SegmentationTrainer") == pytest.approx(62.51)
    assert module.engine_minutes(log, "SupervisedEvaluator") == pytest.approx(0.5)
    assert module.engine_minutes(tmp_path / "missing.log", "SegmentationTrainer") is None


def test_dry_run_with_profiles_and_variants(tmp_path, capsys):
    printed = _reproduce(
        ["--methods", "cdal", "segdiff", "--variants", "2d", "2.5d", "3d", "--dataset", "hippocampus"]
        + ["--folds", "0", "--results", str(tmp_path), "--profile", "--context_slices", "2", "--dry_run"],
        capsys,
    )
    commands = [line for line in printed.splitlines() if line.startswith("$ ")]
    trains = [c for c in commands if "run training" in c]
    assert len(trains) == 5  # cdal 2d, 2.5d, 3d; segdiff 2d, 2.5d (no 3-D SegDiff)
    assert "segdiff: no 3-D network" in printed
    for command in commands:
        assert command.index("datasets/hippocampus.yaml") < command.index("profiles/")
    by_root = {c.split("--bundle_root ")[1].split()[0]: c for c in trains}
    assert "--context_slices" not in by_root[f"{tmp_path}/cdal/hippocampus/fold0"]
    assert "--context_slices 2" in by_root[f"{tmp_path}/cdal_2.5d/hippocampus/fold0"]
    assert "--spatial_dims 3" in by_root[f"{tmp_path}/cdal_3d/hippocampus/fold0"]
    assert "profiles/segdiff_hippocampus.yaml" in by_root[f"{tmp_path}/segdiff_2.5d/hippocampus/fold0"]


@pytest.mark.parametrize("method", ["cdal", "segdiff", "unet"])
def test_hippocampus_profiles_compose_for_every_variant(method):
    from monai.bundle import ConfigParser

    for variant in ({}, {"context_slices": 1}, {"spatial_dims": 3}):
        if variant.get("spatial_dims") == 3 and method == "segdiff":
            continue
        parser = ConfigParser()
        files = [
            "train.yaml",
            f"methods/{method}.yaml",
            "datasets/hippocampus.yaml",
            f"profiles/{method}_hippocampus.yaml",
        ]
        parser.read_config(_configs(*files))
        for key, value in variant.items():
            parser[key] = value
        network = parser.get_parsed_content("network_def")
        assert network.image_channels == 1 + 2 * variant.get("context_slices", 0)
        assert parser.get_parsed_content("max_train_minutes") == 60
        assert parser.get_parsed_content("val_fraction") == 0.1
        dims = variant.get("spatial_dims", 2)
        assert len(parser.get_parsed_content("roi_size")) == dims


def test_tabulate_only_can_leave_out_unfinished_variants(results, capsys):
    printed = _reproduce(
        ["--methods", "cdal", "cdal_n1", "--variants", "2d", "2.5d", "--dataset", "cxr", "--folds", "0", "1"]
        + ["--results", str(results), "--tabulate_only", "--skip_missing"],
        capsys,
    )
    assert "cdal_2.5d: no finished evaluation for folds [0, 1]; left out of the table" in printed
    assert "| cdal_n1 |" in printed and "| cdal_2.5d |" not in printed
