"""Faults survived: a seeded run resumed from an epoch boundary ends with the weights of the uninterrupted run, also
after a real ``kill -9`` at an arbitrary point (tiny cDAL on the tiny synthetic data, tests/workflow_matrix.py)."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from workflow_matrix import run_cell, write_tiny_data

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("resume"))["synthetic"]


def _train(root: Path, data: dict, **extra) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    try:
        run_cell("training", "cdal", "synthetic", root, data, extra={"val_interval": 2, **extra})
    finally:
        logging.disable(logging.NOTSET)
        torch.set_num_threads(threads)
    return torch.load(root / "models" / "checkpoints" / "last.pt", weights_only=True)


def _differences(a, b, where="") -> list[str]:
    """Paths at which two nested states (dicts, lists, tensors, numbers) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} != {sorted(b)}"]
        return [d for key in a for d in _differences(a[key], b[key], f"{where}.{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        return [] if torch.equal(a, b) else [where]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"]
    for group in ("networks", "optimizers", "lr_schedulers", "ema_network"):
        if group in a or group in b:
            assert _differences(a[group], b[group], group) == []


def _tracked_runs(root: Path):
    """The MLflow client of a run folder's tracking database and its runs, oldest first."""
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return client, sorted(runs, key=lambda r: r.info.start_time)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("uninterrupted"), data, max_epochs=EPOCHS)


def test_resuming_at_an_epoch_boundary_gives_the_uninterrupted_weights(data, uninterrupted, tmp_path):
    # the same run stopped at its first validation epoch (a time budget that is already spent), then resumed
    first = _train(tmp_path, data, max_epochs=EPOCHS, max_train_minutes=1e-9)
    assert first["trainer"]["iteration"] == 4 and "random_states" in first
    resumed = _train(tmp_path, data, max_epochs=EPOCHS, resume=True)
    _assert_same_weights(resumed, uninterrupted)
    # the budget stop finished its MLflow run: the resume is a new run of the same name, linked to it
    (client, runs) = _tracked_runs(tmp_path)
    assert len(runs) == 2 and runs[0].info.run_name == runs[1].info.run_name
    assert runs[1].data.tags["resumed_from"] == runs[0].info.run_id
    assert [m.step for m in client.get_metric_history(runs[1].info.run_id, "val_dice")] == [4]


def test_kill_9_mid_run_then_resume_loses_at_most_the_epoch_and_ends_with_the_same_weights(
    data, uninterrupted, tmp_path
):
    script = (
        "import sys, torch; from pathlib import Path; sys.path.insert(0, 'tests'); "
        "from workflow_matrix import run_cell; torch.set_num_threads(1); "
        f"run_cell('training', 'cdal', 'synthetic', Path({str(tmp_path)!r}), {data!r}, "
        f"extra={{'val_interval': 2, 'max_epochs': {EPOCHS}}})"
    )
    last = tmp_path / "models" / "checkpoints" / "last.pt"
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        while not last.exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)  # early in the second epoch (its validation, logged before its checkpoint, comes later)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    killed = torch.load(last, weights_only=True)  # never half-written
    assert killed["trainer"]["iteration"] in range(2, 2 * EPOCHS, 2)  # an epoch boundary before the end
    resumed = _train(tmp_path, data, max_epochs=EPOCHS, resume=True)
    _assert_same_weights(resumed, uninterrupted)
    # MLflow shows one training run that continued: the interrupted run's id, its epochs counted on
    (client, runs) = _tracked_runs(tmp_path)
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_dice")]
    assert steps == list(range(2, EPOCHS + 1, 2)), steps  # each validated epoch once, none twice
