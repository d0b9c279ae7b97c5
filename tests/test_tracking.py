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
