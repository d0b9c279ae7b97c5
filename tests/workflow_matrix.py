"""Every method x dataset x workflow of the bundle, composed from the configs and run in-process on tiny data.

Used by tests/test_config_matrix.py (composition only) and tests/test_workflow_matrix.py (real runs). A cell is
``(method, dataset)``; its three workflows are

- ``training``: configs/train.yaml + the method and dataset overlays;
- ``evaluating``: configs/train.yaml + configs/evaluate.yaml + the overlays;
- ``inference``: configs/inference.yaml + the overlays.

``TINY`` holds the overrides that make a cell run in seconds on a CPU: small networks, one short epoch, two
generations, small images. The data are written by the project's own generators, in each dataset's on-disk layout.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from bundle import composer

REPO = composer.BUNDLE_ROOT
CONFIGS = composer.CONFIGS
METHODS = ("cdal", "segdiff", "unet", "prob_unet", "mose")
DATASETS = ("synthetic", "monuseg", "cxr", "hippocampus", "lidc")
WORKFLOWS = composer.WORKFLOWS

# small networks: the same overrides serve training, evaluation and inference of a cell
TINY_METHOD: dict[str, dict[str, Any]] = {
    "cdal": {
        "network_def#num_channels": 8,
        "network_def#channel_mult": [1, 2],
        "network_def#nz": 4,
        "network_def#z_emb_dim": 8,
        "network_def#cond_enc_layers": 1,
        "discriminator_def#ngf": 2,
        "discriminator_def#channel_mult": [1, 1, 1],
    },
    "segdiff": {
        "network_def#channel_mult": [1, 1],
        "network_def#attention_resolutions": [],
        "network_def#rrdb_features": 8,
        "network_def#rrdb_growth": 4,
        "network_def#num_heads": 1,
        "sampling_steps": 2,
        "num_timesteps": 20,
        "beta_schedule": "paper",
    },
    "unet": {"network_def#channels": [8, 16, 32], "network_def#strides": [2, 2], "network_def#num_res_units": 1},
    "prob_unet": {"network_def#num_channels": [8, 16, 32], "latent_dim": 2, "network_def#num_fcomb_layers": 1},
    "mose": {"network_def#num_channels": [8, 16, 32], "samples_per_expert": 2},
}
TINY_DATASET: dict[str, dict[str, Any]] = {
    "synthetic": {"image_size": 64, "patch_size": 32, "batch_size": 2},
    "monuseg": {"image_size": 64, "patch_size": 32, "batch_size": 2},
    "cxr": {"image_size": 32, "patch_size": 32, "batch_size": 2},
    "hippocampus": {"patch_size": 16, "image_size": 16, "crops_per_volume": 1, "slice_batch_size": 32},
    "lidc": {"image_size": 32, "patch_size": 32, "batch_size": 2},
}
TINY_RUN = {"max_epochs": 1, "epoch_length": 2, "val_interval": 1, "num_generations": 2, "loss_log_interval": 1}


def config_files(
    workflow: str, method: str, dataset: str, method_first: bool = True, workflow_files: Sequence[str] = ()
) -> list[Path]:
    """The config files of one cell (plus further workflow overlays), the method overlay before or after the
    dataset overlay: the bundle's composer."""
    return composer.config_files(workflow, method, dataset, method_first=method_first, workflow_files=workflow_files)


def merged_config(files: Sequence[Path]) -> dict:
    """The configs merged the way ``monai.bundle run --config_file [...]`` merges them (no parsing)."""
    return ConfigParser.load_config_files([str(f) for f in files])


def resolved_config(files: Sequence[Path]) -> dict:
    """The merged configs with MONAI's macros (``%file#key``) resolved from the bundle root, as a run sees them."""
    return _normalise_ids(composer.compose(files).get())


def _normalise_ids(value: Any) -> Any:
    """References written ``@a#b`` and ``@a::b`` are the same id (the macros keep the spelling of their file)."""
    if isinstance(value, dict):
        return {k: _normalise_ids(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise_ids(v) for v in value]
    return value.replace("#", "::") if isinstance(value, str) else value


def write_tiny_data(root: Path) -> dict[str, dict[str, Any]]:
    """Tiny datasets in their original layouts under ``root``; returns per dataset the overrides that point at
    them (``dataset_dir``/``dataset_root``) and the folder of raw inputs for inference (``input_dir``)."""
    from bundle.data.cxr import write_synthetic_cxr
    from bundle.data.hippocampus import write_synthetic_hippocampus
    from bundle.data.lidc_synthetic import ensure_synthetic_lidc
    from bundle.data.synthetic import ensure_synthetic_monuseg

    root = Path(root)
    monuseg = ensure_synthetic_monuseg(root / "monuseg", num_train=6, num_test=2, size=64, seed=0)
    cxr = write_synthetic_cxr(root / "cxr", num_shenzhen=6, num_montgomery=3, size=48, seed=0)
    hippo = write_synthetic_hippocampus(root / "hippocampus", num_cases=8, shape=(22, 26, 20), seed=0)
    lidc = ensure_synthetic_lidc(root / "lidc", num_train=8, num_test=2, size=32, seed=0)
    inputs = {}
    for name, pattern, base in (
        ("cxr", "CXR_png/*.png", cxr),
        ("hippocampus", "imagesTr/*.nii.gz", hippo),
        ("lidc", "testing/*/image_*.jpg", lidc),
    ):
        folder = root / f"{name}_inputs"
        folder.mkdir(exist_ok=True)
        for path in sorted(Path(base).glob(pattern))[:2]:
            shutil.copy(path, folder / path.name)
        inputs[name] = folder
    synthetic_root = (
        f"$bundle.data.synthetic.ensure_synthetic_monuseg('{monuseg}', num_train=6, num_test=2, size=64, seed=0)"
    )
    return {
        "synthetic": {"dataset_root": synthetic_root, "input_dir": str(Path(monuseg) / "MoNuSegTestData")},
        "monuseg": {"dataset_dir": str(monuseg), "input_dir": str(Path(monuseg) / "MoNuSegTestData")},
        "cxr": {"dataset_dir": str(cxr), "input_dir": str(inputs["cxr"])},
        "hippocampus": {"dataset_dir": str(hippo), "input_dir": str(inputs["hippocampus"])},
        "lidc": {"dataset_dir": str(lidc), "input_dir": str(inputs["lidc"])},
    }


def run_cell(
    workflow: str,
    method: str,
    dataset: str,
    bundle_root: Path,
    data: dict[str, Any],
    extra: dict | None = None,
    workflow_files: Sequence[str] = (),
) -> ConfigParser:
    """Run one workflow of a cell in this process (``training``, ``evaluating`` or ``inference``)."""
    overrides = {**TINY_METHOD[method], **TINY_DATASET[dataset], "bundle_root": str(bundle_root)}
    if workflow == "inference":
        overrides.update(num_generations=2, input_dir=data["input_dir"], output_dir=str(bundle_root / "inference"))
    else:
        overrides.update(TINY_RUN, tracking_uri=f"sqlite:///{bundle_root / 'mlruns.db'}")
        overrides.update({k: v for k, v in data.items() if k != "input_dir"})
    overrides.update(extra or {})
    parser = composer.compose(config_files(workflow, method, dataset, workflow_files=workflow_files), overrides)
    parser.parse()
    parser.get_parsed_content("initialize")  # as ``monai.bundle run`` does: the excepthook of input errors
    parser.get_parsed_content("run")
    return parser
