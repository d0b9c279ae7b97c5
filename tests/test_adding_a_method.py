"""The worked example of docs/architecture.md ("Adding a method") is true: its network file and its overlay, taken
from the page as they are, train, evaluate and serve through the unchanged workflows."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from workflow_matrix import REPO, TINY_DATASET, TINY_RUN, merged_config, write_tiny_data

PAGE = REPO / "docs" / "architecture.md"


def _example(name: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\s*```\w+\n(.*?)```", PAGE.read_text(), re.S)
    assert match, f"docs/architecture.md has no '{name}' example block"
    return match.group(1)


def test_the_documented_method_is_one_file_and_a_short_overlay():
    overlay = _example("overlay")
    assert len(overlay.strip().splitlines()) <= 45
    assert "bundle.engines.steps.denoising.DenoisingStep" in overlay  # no new step file


def test_the_documented_method_runs_every_workflow(tmp_path, monkeypatch):
    module = tmp_path / "eps_unet_example.py"
    module.write_text(_example("network"))
    overlay = tmp_path / "eps_unet.yaml"
    overlay.write_text(_example("overlay").replace("bundle.networks.eps_unet.", "eps_unet_example."))
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_tiny_data(tmp_path / "data")["synthetic"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_workflows(tmp_path, overlay, data)
    finally:
        torch.set_num_threads(threads)


def _run_workflows(tmp_path: Path, overlay: Path, data: dict) -> None:
    from monai.bundle import ConfigParser

    root = tmp_path / "run"
    tiny = {
        **TINY_DATASET["synthetic"],
        "bundle_root": str(root),
        "num_timesteps": 20,
        "num_generations": 2,
        "network_def#num_channels": [8, 16],
    }
    workflows = [  # training, evaluating, inference
        (["train.yaml"], {**TINY_RUN, "dataset_root": data["dataset_root"]}),
        (["train.yaml", "evaluate.yaml"], {**TINY_RUN, "dataset_root": data["dataset_root"]}),
        (["inference.yaml"], {"input_dir": data["input_dir"], "output_dir": str(root / "inference")}),
    ]
    for bases, overrides in workflows:
        files = [REPO / "configs" / b for b in bases] + [overlay]
        parser = ConfigParser()
        parser.read_config([str(f) for f in files])
        for key, value in {**tiny, **overrides, "tracking_uri": f"sqlite:///{root / 'mlruns.db'}"}.items():
            parser[key] = value
        parser.get_parsed_content("run")
    last = torch.load(root / "models" / "checkpoints" / "last.pt", weights_only=True)
    assert set(last["networks"]) == {"network"} and last["ema"]["num_updates"] == 2
    assert (root / "eval" / "evaluation_synthetic_test" / "metrics_summary.json").is_file()
    assert len(list((root / "inference" / "masks").glob("*.png"))) == 2
    assert merged_config([REPO / "configs" / "train.yaml", overlay])["method"] == "eps_unet"
