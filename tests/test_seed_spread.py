"""tools/seed_spread.py: the validation history of a real (tiny) training run read from its MLflow database,
and the per-method spread and drop figures it reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spread():
    spec = importlib.util.spec_from_file_location("seed_spread", REPO / "tools" / "seed_spread.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_runs_with_their_test_scores(spread, tmp_path, one_thread, capsys):
    """Two real (tiny) U-Net trainings through the bundle CLI, each scored once on the test subset (--test): the
    validation history, the trainer's minutes and the test Dice come back per run and per method."""
    data = tmp_path / "data"
    tiny = [
        f"dataset_root=$bundle.data.synthetic.ensure_synthetic_monuseg('{data}', num_train=6, num_test=2, size=64, "
        "seed=0)",
        "image_size=64",
        "patch_size=32",
        "batch_size=2",
        "max_epochs=3",
        "epoch_length=2",
        "val_interval=1",
        "network_def#channels=[8,16,32]",
        "network_def#strides=[2,2]",
        "network_def#num_res_units=1",
    ]
    results = tmp_path / "spread"
    argv = ["--methods", "unet", "--seeds", "1", "2", "--results", str(results), "--test", "--set", *tiny]
    assert spread.main(argv) == 0
    root = results / "unet" / "seed1"
    history = spread.validation_history(root / "mlruns.db")
    assert [epoch for epoch, _ in history] == [1, 2, 3]
    assert all(0.0 <= dice <= 1.0 for _, dice in history)
    summary = spread.summarise_run(history)
    assert summary["best"] == max(d for _, d in history) and summary["last"] == history[-1][1]
    report = (root / "evaluation_test" / "metrics_summary.json").read_text()
    assert '"num_images": 2' in report  # the two test tiles, never the validation ones
    saved = json.loads((results / "seed_spread.json").read_text())["unet"]
    for seed in ("1", "2"):
        run = saved["runs"][seed]
        assert 0.0 <= run["test_dice"] <= 1.0 and run["train_minutes"] > 0.0
    assert saved["summary"]["test_dice"]["min"] <= saved["summary"]["test_dice"]["max"]
    row = next(
        line for line in (results / "seed_spread.md").read_text().splitlines() if line.startswith("| unet | 2 |")
    )
    assert row.count("(") == 2  # test Dice and train minutes: mean (min - max)
    # a second call reads the finished runs and evaluations as they are
    capsys.readouterr()
    assert spread.main(argv) == 0
    assert "$ " not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no MLflow database"):
        spread.validation_history(tmp_path / "missing.db")


def test_spread_and_drop(spread):
    run = spread.summarise_run([(5, 0.70), (10, 0.82), (15, 0.78), (20, 0.80)])
    assert run["best"] == 0.82 and run["best_epoch"] == 10 and run["last"] == 0.80
    assert run["drop_after_best"] == pytest.approx(0.04)
    steady = spread.summarise_run([(5, 0.80), (10, 0.81), (15, 0.82)])
    assert steady["drop_after_best"] == 0.0
    summary = spread.summarise_method({1: run, 2: steady}, max_spread=0.05, max_drop=0.03)
    assert summary["spread"] == pytest.approx(0.0) and summary["max_drop"] == pytest.approx(0.04)
    assert summary["holds"] is False  # the first seed falls 0.04 after its best
    assert spread.summarise_method({2: steady}, 0.05, 0.03)["holds"] is True
    table = spread.format_markdown(
        {"cdal": {"runs": {1: {**run, "history": [(5, 0.7)]}}, "summary": summary}}, 0.05, 0.03
    )
    assert "| cdal | 2 | 0.8200 | 0.8200 | 0.8200 | 0.0000 | 0.0400 | no | - | - |" in table


def test_dry_run_commands(spread, tmp_path, capsys):
    argv = ["--methods", "cdal", "unet", "--seeds", "1", "2", "--results", str(tmp_path), "--dry_run"]
    assert spread.main(argv + ["--set", "max_epochs=3"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 4
    assert "--seed 2" in commands[1] and "methods/unet.yaml" in commands[2] and "--max_epochs 3" in commands[3]
    assert f"--bundle_root {tmp_path}/unet/seed1" in commands[2]
