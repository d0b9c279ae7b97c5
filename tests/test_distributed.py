"""Real two-process training under torchrun (gloo on CPU) with the multi-GPU overlay: cDAL (train.yaml), SegDiff
(methods/segdiff.yaml: DDP-wrapped trained network, plain EMA network) and cDAL on Hippocampus volumes
(datasets/hippocampus.yaml: slice batches, per-volume validation gathered over the ranks)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from bundle import composer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SMALL_DATA = "$bundle.data.synthetic.ensure_synthetic_monuseg(@dataset_dir, num_train=12, num_test=3, size=256, seed=0)"
OVERRIDES = {
    "dataset_root": SMALL_DATA,
    "val_fraction": 0.25,
    "epoch_length": 5,
    "max_epochs": 2,
    "val_interval": 2,
    "num_generations": 2,
    "batch_size": 4,
}
RANK_WEIGHTS = """
finalize:
  - "$torch.save(bundle.runtime.unwrap_network(@network).state_dict(), @output_dir + '/rank_' + os.environ['RANK'] + '.pt')"
"""
SEGDIFF_OVERRIDES = {**OVERRIDES, "sampling_steps": 2}
SEGDIFF_RANK_WEIGHTS = """
finalize:
  - >-
    $torch.save({'network': bundle.runtime.unwrap_network(@network).state_dict(),
    'train_network': bundle.runtime.unwrap_network(@train_network).state_dict(),
    'network_is_ddp': isinstance(@network, torch.nn.parallel.DistributedDataParallel),
    'train_network_is_ddp': isinstance(@train_network, torch.nn.parallel.DistributedDataParallel)},
    @output_dir + '/rank_' + os.environ['RANK'] + '.pt')
"""


def _torchrun(root: Path, configs: list[Path], overrides: dict, dataset_dir: Path | None = None) -> Path:
    """Run ``training`` with two gloo processes under torchrun in ``root`` (the bundle root); returns ``root``."""
    settings = {"bundle_root": root, "dataset_dir": dataset_dir or root / "data", **overrides}
    cmd = composer.bundle_command("training", configs, settings, nproc_per_node=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=composer.BUNDLE_ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return root


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    extra = root / "rank_weights.yaml"
    extra.write_text(RANK_WEIGHTS)
    return _torchrun(root, [CONFIGS / "train.yaml", CONFIGS / "multi_gpu_train.yaml", extra], OVERRIDES)


@pytest.fixture(scope="module")
def hippocampus_ddp_run(tmp_path_factory):
    from bundle.data.hippocampus import write_synthetic_hippocampus

    root = tmp_path_factory.mktemp("ddp_hippocampus")
    data = write_synthetic_hippocampus(root / "Task04_Hippocampus", num_cases=8, shape=(22, 26, 20), seed=0)
    configs = [
        CONFIGS / "train.yaml",
        CONFIGS / "multi_gpu_train.yaml",
        CONFIGS / "methods" / "cdal.yaml",  # named: its network settings are overridden below
        CONFIGS / "datasets" / "hippocampus.yaml",
    ]
    overrides = {
        "epoch_length": 4,
        "max_epochs": 2,
        "val_interval": 2,
        "num_generations": 2,
        "patch_size": 16,
        "image_size": 16,
        "crops_per_volume": 1,
        "val_fraction": 0.5,
        "network_def#num_channels": 16,
        "loss_log_interval": 4,
        "network_def#attention_resolutions": "[]",
    }
    return _torchrun(root, configs, overrides, dataset_dir=data)


@pytest.fixture(scope="module")
def segdiff_ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_segdiff")
    extra = root / "rank_weights.yaml"
    extra.write_text(SEGDIFF_RANK_WEIGHTS)
    configs = [CONFIGS / "train.yaml", CONFIGS / "methods" / "segdiff.yaml", CONFIGS / "multi_gpu_train.yaml", extra]
    return _torchrun(root, configs, SEGDIFF_OVERRIDES)


def test_two_ranks_end_cleanly_with_one_checkpoint_and_one_mlflow_run(ddp_run):
    models = ddp_run / "models"
    assert sorted(p.name for p in models.rglob("*.pt")) == ["last.pt", "model.pt"]
    assert not list(models.rglob("*.tmp"))
    with sqlite3.connect(ddp_run / "mlruns.db") as db:
        runs = db.execute("select run_uuid, status from runs").fetchall()
        assert len(runs) == 1 and runs[0][1] == "FINISHED"
        keys = {k for (k,) in db.execute("select distinct key from metrics")}
    assert {"loss_g", "val_dice"} <= keys
    last = torch.load(models / "checkpoints" / "last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 10  # losses are logged every 10 iterations
    assert not any(k.startswith("module.") for k in last["networks"]["generator"])  # saved without the DDP wrapper


def test_saved_weights_equal_every_ranks_weights(ddp_run):
    last = torch.load(ddp_run / "models" / "checkpoints" / "last.pt", weights_only=True)["networks"]["generator"]
    for rank in (0, 1):
        weights = torch.load(ddp_run / "eval" / f"rank_{rank}.pt", weights_only=True)
        assert weights.keys() == last.keys()
        for key in last:
            torch.testing.assert_close(weights[key], last[key], rtol=0, atol=0)


def test_two_rank_validation_metric_equals_single_process_value(ddp_run):
    """val_dice gathered over 2 ranks (2 + 1 images) equals one process validating all 3 images."""
    ddp_value = torch.load(ddp_run / "models" / "checkpoints" / "last.pt", weights_only=True)["checkpointer"]
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser.update({"bundle_root": str(ddp_run), "dataset_dir": str(ddp_run / "data"), **OVERRIDES})
    parser["validate#handlers_by_name"] = {}  # no MLflow run or panels for this check
    network = parser.get_parsed_content("network")
    last = torch.load(ddp_run / "models" / "checkpoints" / "last.pt", weights_only=True)
    network.load_state_dict(last["networks"]["generator"])
    evaluator = parser.get_parsed_content("validate#evaluator")
    assert len(evaluator.data_loader.dataset) == 3
    evaluator.run()
    single = float(evaluator.state.metrics["val_dice"])
    print(f"val_dice: 2 ranks {ddp_value['best_metric']:.6f}, 1 process {single:.6f}")
    assert single == pytest.approx(ddp_value["best_metric"], abs=1e-6)


def _mlflow_runs_and_metric_keys(root: Path) -> tuple[list, set[str]]:
    with sqlite3.connect(root / "mlruns.db") as db:
        runs = db.execute("select run_uuid, status from runs").fetchall()
        keys = {k for (k,) in db.execute("select distinct key from metrics")}
    return runs, keys


def test_segdiff_two_ranks_end_cleanly_with_one_checkpoint_and_one_mlflow_run(segdiff_ddp_run):
    models = segdiff_ddp_run / "models"
    assert sorted(p.relative_to(models).as_posix() for p in models.rglob("*.pt")) == ["checkpoints/last.pt", "model.pt"]
    assert not list(models.rglob("*.tmp"))
    runs, keys = _mlflow_runs_and_metric_keys(segdiff_ddp_run)
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    assert {"loss", "val_dice"} <= keys
    last = torch.load(models / "checkpoints" / "last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 10 and last["ema"]["num_updates"] == 10
    for weights in (last["networks"]["network"], last["ema_network"]):
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in weights)  # saved without wrappers
    model = torch.load(models / "model.pt", weights_only=True)
    assert model.keys() == last["ema_network"].keys()


def test_segdiff_trained_network_is_ddp_and_every_rank_holds_the_saved_weights(segdiff_ddp_run):
    last = torch.load(segdiff_ddp_run / "models" / "checkpoints" / "last.pt", weights_only=True)
    ranks = [torch.load(segdiff_ddp_run / "eval" / f"rank_{r}.pt", weights_only=True) for r in (0, 1)]
    for weights in ranks:
        assert weights["train_network_is_ddp"] and not weights["network_is_ddp"]  # the EMA stays a plain module
        for saved, held in (
            (last["networks"]["network"], weights["train_network"]),
            (last["ema_network"], weights["network"]),
        ):
            assert held.keys() == saved.keys()
            for key in saved:
                torch.testing.assert_close(held[key], saved[key], rtol=0, atol=0)
    trained, ema = ranks[0]["train_network"], ranks[0]["network"]
    assert any(not torch.equal(trained[k], ema[k]) for k in trained)  # the EMA lags the trained weights


def test_segdiff_two_rank_validation_metric_equals_single_process_value(segdiff_ddp_run):
    """SegDiff's val_dice (EMA network, 2 + 1 images on 2 ranks) equals one process validating all 3 images."""
    last = torch.load(segdiff_ddp_run / "models" / "checkpoints" / "last.pt", weights_only=True)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "methods" / "segdiff.yaml")])
    parser.update(
        {"bundle_root": str(segdiff_ddp_run), "dataset_dir": str(segdiff_ddp_run / "data"), **SEGDIFF_OVERRIDES}
    )
    parser["validate#handlers_by_name"] = {}  # no MLflow run or panels for this check
    parser.get_parsed_content("network").load_state_dict(last["ema_network"])
    evaluator = parser.get_parsed_content("validate#evaluator")
    assert len(evaluator.data_loader.dataset) == 3
    evaluator.run()
    single = float(evaluator.state.metrics["val_dice"])
    ddp_value = last["checkpointer"]["best_metric"]
    print(f"segdiff val_dice: 2 ranks {ddp_value:.6f}, 1 process {single:.6f}")
    assert single == pytest.approx(ddp_value, abs=1e-6)


def test_hippocampus_two_ranks_write_one_checkpoint_pair_and_one_mlflow_run(hippocampus_ddp_run):
    """The Hippocampus overlay under torchrun: validation handlers keep their rank-0 guards (one MLflow run, one
    set of panels), one checkpoint pair, and the per-volume validation Dice reaches rank 0's checkpointer."""
    models = hippocampus_ddp_run / "models"
    assert sorted(p.relative_to(models).as_posix() for p in models.rglob("*.pt")) == ["checkpoints/last.pt", "model.pt"]
    runs, keys = _mlflow_runs_and_metric_keys(hippocampus_ddp_run)
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    assert {"loss_g", "loss_d", "val_dice", "val_iou"} <= keys
    last = torch.load(models / "checkpoints" / "last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 8 and 0.0 <= last["checkpointer"]["best_metric"] <= 1.0
    assert last["networks"]["generator"]["head_conv.weight"].shape[0] == 3  # three class channels
    panels = sorted((hippocampus_ddp_run / "eval" / "panels").glob("*.png"))
    assert [p.name for p in panels] == ["validation_epoch_0002.png"]


def _rank_process(parent: int, rank: str) -> int | None:
    """The pid of the worker with ``RANK=rank`` among the descendants of ``parent`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    stack = list(children.get(parent, []))
    while stack:
        pid = stack.pop()
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + rank.encode() in environ:
            return pid
        stack += children.get(pid, [])
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc (Linux)")
def test_a_rank_that_dies_ends_every_rank_within_a_bounded_time_and_is_named(tmp_path):
    import signal
    import time

    files = [CONFIGS / "train.yaml", CONFIGS / "multi_gpu_train.yaml"]
    settings = {
        "bundle_root": tmp_path,
        "dataset_dir": tmp_path / "data",
        **OVERRIDES,
        "max_epochs": 200,
        "val_interval": 100,
    }
    cmd = composer.bundle_command("training", files, settings, nproc_per_node=2)
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=composer.BUNDLE_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})  # fmt: skip
        try:
            deadline = time.time() + 300
            while "Epoch[2] Complete" not in log.read_text() and time.time() < deadline and proc.poll() is None:
                time.sleep(0.5)  # both ranks are in their training loop (epoch 2 of 200)
            assert proc.poll() is None, log.read_text()[-3000:]
            victim = _rank_process(proc.pid, "1")
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            killed_at = time.time()
            proc.wait(timeout=120)
            ended_after = time.time() - killed_at
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert proc.returncode != 0
    assert ended_after < 60, ended_after  # torchrun's agent stops the surviving rank; nothing hangs in a collective
    assert _rank_process(proc.pid, "0") is None
    import re

    root_cause = re.search(
        r"Root Cause \(first observed failure\):.*?rank\s*: (\d+) .*?exitcode\s*: (-?\d+)", text, re.S
    )
    assert root_cause is not None and root_cause.groups() == ("1", "-9"), text[-3000:]  # the failing rank, named
