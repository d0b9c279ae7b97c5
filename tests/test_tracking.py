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
