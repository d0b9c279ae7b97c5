"""MLflow run names are unique per process: two runs started in the same second into one tracking database (two
CPU reproductions side by side) must not find each other's run and collide on its params."""

import os
from pathlib import Path

from monai.bundle import ConfigParser

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_training_and_evaluation_run_names_carry_the_process_id(tmp_path):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml")])
    parser["bundle_root"] = str(tmp_path)
    for key in ("run_name", "eval_run_name"):
        name = parser.get_parsed_content(key)
        assert name.endswith(f"_{os.getpid()}"), name
        assert name.startswith("eval_cdal_synthetic_test_" if key == "eval_run_name" else "cdal_synthetic_")


def test_a_finished_run_extended_by_a_resume_is_a_linked_run_with_its_changes_tagged(tmp_path):
    import logging
    import sys

    import mlflow
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from workflow_matrix import run_cell, write_tiny_data

    data = write_tiny_data(tmp_path / "data")["synthetic"]
    root = tmp_path / "run"
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    try:
        run_cell("training", "unet", "synthetic", root, data, extra={"val_interval": 1, "max_epochs": 1})
        run_cell(
            "training", "unet", "synthetic", root, data, extra={"val_interval": 1, "max_epochs": 2, "resume": True}
        )
    finally:
        logging.disable(logging.NOTSET)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    runs = sorted(
        (r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])),
        key=lambda r: r.info.start_time,
    )
    assert len(runs) == 2 and runs[0].info.run_name == runs[1].info.run_name
    first, extension = runs
    assert extension.data.tags["resumed_from"] == first.info.run_id
    assert extension.data.tags["changed_on_resume"] == "max_epochs: 1 -> 2"
    assert [m.step for m in client.get_metric_history(extension.info.run_id, "val_dice")] == [2]
    # the cosine schedule took the new length (it would otherwise run past its end and rise again)
    state = torch.load(root / "models" / "checkpoints" / "last.pt", weights_only=True)
    schedules = state["lr_schedulers"]
    assert schedules and all(s["T_max"] == 2 for s in schedules.values()), schedules


def test_a_new_sqlite_store_starts_as_a_copy_of_the_migrated_template(tmp_path, monkeypatch):
    import sqlite3

    from mlflow.tracking import MlflowClient

    from bundle.handlers.tracking import TEMPLATES_ENV, make_sqlite_template, seed_sqlite_store

    templates = tmp_path / "templates"
    template = make_sqlite_template(str(templates))
    monkeypatch.setenv(TEMPLATES_ENV, str(templates))
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "run" / "mlruns.db"
    assert seed_sqlite_store(f"sqlite:///{store}") and store.read_bytes()[:16] == b"SQLite format 3\x00"
    assert not list(store.parent.glob("*.partial"))
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")  # MLflow opens it as its own, nothing to migrate
    run = client.create_run(client.create_experiment("x")).info.run_id
    client.log_metric(run, "dice", 0.5)
    assert client.get_run(run).data.metrics == {"dice": 0.5}
    with sqlite3.connect(store) as db:  # the Default experiment's artifacts where MLflow itself would put them
        location = db.execute("select artifact_location from experiments where experiment_id = 0").fetchone()[0]
    assert location == str(tmp_path / "mlruns" / "0")
    before = store.read_bytes()
    assert not seed_sqlite_store(f"sqlite:///{store}") and store.read_bytes() == before  # never over a store
    assert not seed_sqlite_store(f"file://{tmp_path / 'mlruns'}") and not (tmp_path / "mlruns").exists()
    (tmp_path / "a_file").write_text("")  # a store that cannot be made there: left to MLflow to report
    assert not seed_sqlite_store(f"sqlite:///{tmp_path / 'a_file' / 'mlruns.db'}")
    Path(template).rename(templates / "mlflow-0.0.0.db")  # another MLflow version's template is not used
    assert not seed_sqlite_store(f"sqlite:///{tmp_path / 'other.db'}") and not (tmp_path / "other.db").exists()
    monkeypatch.delenv(TEMPLATES_ENV)
    assert not seed_sqlite_store(f"sqlite:///{tmp_path / 'other.db'}")
