"""MONAI's own bundle checks: the properties a train and an infer workflow must have (ConfigWorkflow)."""

from __future__ import annotations

import pytest
from monai.bundle import ConfigWorkflow
from workflow_matrix import CONFIGS


@pytest.mark.parametrize(
    ("workflow_type", "files"),
    [
        ("train", ["train.yaml"]),
        ("train", ["train.yaml", "methods/segdiff.yaml", "datasets/hippocampus.yaml"]),
        ("infer", ["inference.yaml"]),
        ("infer", ["inference.yaml", "methods/mose.yaml", "datasets/lidc.yaml"]),
    ],
)
def test_check_properties_finds_nothing_missing(tmp_path, workflow_type, files):
    data = tmp_path / "data"
    if "datasets/hippocampus.yaml" in files:
        from bundle.data.hippocampus import write_synthetic_hippocampus

        write_synthetic_hippocampus(data, num_cases=4, shape=(20, 24, 18))
    inputs = {}
    if workflow_type == "infer":  # a folder with one image to infer
        import numpy as np
        from PIL import Image

        (tmp_path / "inputs").mkdir()
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "inputs" / "a.png")
        inputs = {"input_dir": str(tmp_path / "inputs")}
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(tmp_path),
        dataset_dir=str(data),
        **inputs,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
