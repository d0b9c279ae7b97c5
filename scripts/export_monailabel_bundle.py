#!/usr/bin/env python
"""Export a trained model as a self-contained MONAI bundle folder that MONAI Label serves and fine-tunes.

MONAI Label's ``BundleInferTask`` / ``BundleTrainTask`` read one ``configs/inference.yaml`` and one
``configs/train.yaml`` (no overlays), ``configs/metadata.json`` and ``models/model.pt``. This script composes the
project's configs for one dataset (and optional method/paper overlays) into those two files, writes the metadata
with the served ``network_data_format`` (label values as ``channel_def``; ``spatial_shape`` 2-D for MoNuSeg tiles,
3-D for Hippocampus volumes, which are inferred slice-wise), and copies the network weights (from ``model.pt`` or
from a training checkpoint's ``generator`` / ``network`` entry), checking that they load into the exported
``network_def``. The folder imports the ``bundle`` package (install the repo into MONAI Label's environment:
scripts/monailabel_env.sh).

    python scripts/export_monailabel_bundle.py --dataset synthetic --checkpoint models/model.pt \\
        --output apps/monailabel/model/monuseg_cdal
    python scripts/export_monailabel_bundle.py --dataset hippocampus --checkpoint <run>/models/model.pt \\
        --output apps/monailabel/model/hippocampus_cdal --dataset_dir /data/Task04_Hippocampus \
        --set network_def#num_channels=16 "network_def#attention_resolutions=[]" num_timesteps=2

An existing output folder is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# dataset -> (training overlays after train.yaml, serving overlay after inference.yaml, served labels, dimension)
DATASETS = {
    "synthetic": ([], "monailabel/infer_2d.yaml", {"0": "background", "1": "nucleus"}, 2),
    "monuseg": (["datasets/monuseg.yaml"], "monailabel/infer_2d.yaml", {"0": "background", "1": "nucleus"}, 2),
    "hippocampus": (
        ["datasets/hippocampus.yaml"],
        "monailabel/infer_hippocampus.yaml",
        {"0": "background", "1": "anterior", "2": "posterior"},
        3,
    ),
}
# keys the serving config takes from the training composition, so the served network is the trained one
SHARED_KEYS = ("network_def", "label_channels", "image_channels", "patch_size", "image_size", "num_timesteps")


def _compose(files: Sequence[Path], overrides: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The network state dict in ``checkpoint``: a plain state dict (model.pt) or a training checkpoint."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{checkpoint}: cannot read it as a PyTorch checkpoint ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{checkpoint}: expected a state dict, got {type(state).__name__}")
    for key in ("generator", "network", "model"):
        if isinstance(state.get(key), dict):
            return state[key]
    if not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{checkpoint}: neither a state dict nor a checkpoint with a 'generator'/'network' entry "
                         f"(keys: {sorted(state)[:8]})")
    return state


def export(
    dataset: str,
    checkpoint: Path,
    output: Path,
    method_configs: Sequence[str] = (),
    overrides: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the MONAI Label bundle folder ``output`` (see the module docstring); returns it."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    checkpoint, output = Path(checkpoint), Path(output)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint")
    if output.exists():
        if not overwrite:
            raise FileExistsError(f"{output}: exists already; pass --overwrite to replace it")
        shutil.rmtree(output)
    train_overlays, serve_overlay, labels, dimension = DATASETS[dataset]
    methods = [CONFIGS / m if not Path(m).is_absolute() else Path(m) for m in method_configs]
    overrides = dict(overrides or {})

    train = _compose(
        [CONFIGS / "train.yaml", *methods, *(CONFIGS / f for f in train_overlays), CONFIGS / "monailabel/train.yaml"],
        overrides,
    )
    infer = _compose([CONFIGS / "inference.yaml", *methods, CONFIGS / serve_overlay], overrides)
    for key in SHARED_KEYS:
        if train.get(key) is not None:
            infer[key] = copy.deepcopy(train.get(key))
    # BundleTrainTask inspects train#handlers as a list of dicts (it adds its CheckpointLoader there): inline the
    # handlers that the project's configs give by reference ('@train#checkpointer')
    handlers = train.get("train#handlers")
    inlined = []
    for item in handlers if isinstance(handlers, list) else []:
        if isinstance(item, str) and item.startswith("@"):
            item = copy.deepcopy(train.get(item[1:]))
        if not isinstance(item, dict):
            raise ValueError(f"train#handlers holds {item!r}; MONAI Label's BundleTrainTask needs dicts")
        inlined.append(item)
    train["train#handlers"] = inlined
    for parser in (train, infer):
        parser["bundle_root"] = "."
        parser["dataset_name"] = dataset

    network = infer.get_parsed_content("network_def", instantiate=True)
    weights = _weights(checkpoint)
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{checkpoint}: weights do not fit the {dataset} network_def of this export:\n{err}") from err

    staging = output.with_name(f".{output.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "configs").mkdir(parents=True)
    (staging / "models").mkdir()
    ConfigParser.export_config_file(infer.get(), str(staging / "configs" / "inference.yaml"), fmt="yaml")
    ConfigParser.export_config_file(train.get(), str(staging / "configs" / "train.yaml"), fmt="yaml")
    shutil.copy2(CONFIGS / "logging.conf", staging / "configs" / "logging.conf")
    torch.save(weights, staging / "models" / "model.pt")

    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    spatial = ["*"] * dimension
    image_channels, label_channels = int(infer.get_parsed_content("image_channels")), len(labels)
    metadata["network_data_format"] = {
        "inputs": {
            "image": {
                "type": "image", "format": "magnitude", "num_channels": image_channels, "spatial_shape": spatial,
                "dtype": "float32", "value_range": [], "is_patch_data": False,
                "channel_def": {"0": "R", "1": "G", "2": "B"} if image_channels == 3 else {"0": "image"},
            }
        },
        "outputs": {
            "pred": {
                "type": "image", "format": "labels", "num_channels": 1, "spatial_shape": spatial, "dtype": "uint8",
                "value_range": [0, label_channels - 1], "is_patch_data": False, "channel_def": labels,
            }
        },
    }
    metadata["monailabel"] = {
        "dataset": dataset, "dimension": dimension, "slice_wise": dimension == 3,
        "uncertainty": "per-pixel standard deviation of the generations' probabilities (largest over the "
        "foreground classes for multi-class models)",
        "source_checkpoint": str(checkpoint.resolve()), "method_configs": [str(m) for m in method_configs],
    }
    metadata["task"] = f"{metadata.get('task', '')} ({dataset}, served through MONAI Label)"
    (staging / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    staging.rename(output)
    return output


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--checkpoint", required=True, type=Path, help="models/model.pt or checkpoints/last.pt")
    parser.add_argument("--output", required=True, type=Path, help="the bundle folder to write (MONAI Label model)")
    parser.add_argument("--method_configs", nargs="*", default=[],
                        help="method/paper overlays the model was trained with, e.g. methods/segdiff.yaml")
    parser.add_argument("--dataset_dir", default=None, help="dataset folder for fine-tuning (dataset_dir key)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="the command-line overrides the model was trained with (values parsed as YAML), "
                        "e.g. network_def#num_channels=16 num_timesteps=2")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    overrides = {"dataset_dir": args.dataset_dir} if args.dataset_dir else {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    out = export(args.dataset, args.checkpoint, args.output, args.method_configs, overrides, args.overwrite)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
