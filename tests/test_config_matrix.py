"""Config composition of every method x dataset x workflow: overlays commute, and write only their own slots.

The real runs of the same cells are in test_workflow_matrix.py.
"""

from __future__ import annotations

import itertools

import pytest
import yaml
from workflow_matrix import CONFIGS, DATASETS, METHODS, WORKFLOWS, config_files, merged_config, resolved_config

CELLS = list(itertools.product(WORKFLOWS, METHODS, DATASETS))


def _keys(path) -> set[str]:
    return set(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize(("workflow", "method", "dataset"), CELLS)
def test_resolved_config_does_not_depend_on_the_overlay_order(workflow, method, dataset):
    method_first = merged_config(config_files(workflow, method, dataset, method_first=True))
    dataset_first = merged_config(config_files(workflow, method, dataset, method_first=False))
    assert method_first == dataset_first
    # and the overlays did reach the composition: the method's network and the dataset's channels
    assert method_first["method"] == method
    assert method_first["network_def"]["image_channels"] == "@image_channels"
    assert method_first["dataset_name"] == dataset


def test_method_and_dataset_overlays_write_disjoint_top_level_slots():
    method_keys = {m: _keys(CONFIGS / "methods" / f"{m}.yaml") for m in METHODS}
    dataset_keys = {d: _keys(CONFIGS / "datasets" / f"{d}.yaml") for d in DATASETS}
    for name, keys in {**method_keys, **dataset_keys}.items():
        nested = [k for k in keys if "#" in k or "::" in k or k.startswith("+")]
        assert not nested, f"{name}: overlays write top-level slots only, not {nested}"
    all_method, all_dataset = set().union(*method_keys.values()), set().union(*dataset_keys.values())
    assert not all_method & all_dataset, f"keys written by both kinds of overlay: {sorted(all_method & all_dataset)}"
    # the workflow files write none of the method or dataset slots the overlays set, except the bases' defaults
    for workflow in ("evaluate.yaml", "evaluate_distribution.yaml", "multi_gpu_train.yaml"):
        overlap = _keys(CONFIGS / workflow) & (all_method | all_dataset)
        assert not overlap, f"{workflow} writes method/dataset slots {sorted(overlap)}"


@pytest.mark.parametrize("base", ["train.yaml", "inference.yaml"])
def test_the_bases_alone_are_the_default_composition(base):
    """train.yaml and inference.yaml alone are cDAL on the synthetic data: every slot they take by macro from the
    overlays resolves to what the explicit composition with those overlays gives."""
    alone = resolved_config([CONFIGS / base])
    explicit = resolved_config(
        [CONFIGS / base, CONFIGS / "methods" / "cdal.yaml", CONFIGS / "datasets" / "synthetic.yaml"]
    )
    assert alone["method"] == "cdal" and alone["dataset_name"] == "synthetic"
    assert {k: explicit[k] for k in alone} == alone
    assert not [k for k, v in alone.items() if isinstance(v, str) and v.startswith("%")], "unresolved macros"


def test_no_config_repeats_a_run_of_six_lines():
    """Each default is written once: no run of six identical (non-comment) lines at two places in configs/."""
    runs: dict[tuple[str, ...], list[str]] = {}
    for path in sorted(CONFIGS.rglob("*.yaml")):
        lines = [" ".join(raw.split()) for raw in path.read_text().splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        for i in range(len(lines) - 5):
            runs.setdefault(tuple(lines[i : i + 6]), []).append(f"{path.relative_to(CONFIGS)}:{i}")
    repeated = {places[0]: places[1:] for places in runs.values() if len(places) > 1}
    assert not repeated, f"repeated six-line runs: {repeated}"


def test_every_method_fills_the_method_slots():
    required = {
        "method",
        "num_generations",
        "network_def",
        "networks",
        "optimizers",
        "lr_schedulers",
        "training_step",
        "sampler",
        "method_params",
        "max_epochs",
        "epoch_length",
        "val_interval",
    }
    for method in METHODS:
        missing = required - _keys(CONFIGS / "methods" / f"{method}.yaml")
        assert not missing, f"methods/{method}.yaml lacks {sorted(missing)}"
