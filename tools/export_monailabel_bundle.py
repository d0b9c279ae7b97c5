#!/usr/bin/env python
"""Export a trained model as a self-contained MONAI bundle folder that MONAI Label serves and fine-tunes.

MONAI Label's ``BundleInferTask`` / ``BundleTrainTask`` read one ``configs/inference.yaml`` and one
``configs/train.yaml`` (no overlays), ``configs/metadata.json`` and ``models/model.pt``. This script composes the
project's configs the way ``monai.bundle run`` does (``inference.yaml`` or ``train.yaml``, then the method overlays,
then the dataset overlay, then ``configs/monailabel/infer.yaml`` or ``train.yaml``, then the ``--set`` overrides the
model was trained with) into those two files, writes the metadata with the served ``network_data_format`` (label
values as ``channel_def``; ``spatial_shape`` 2-D for tiles, radiographs and crops, 3-D for Hippocampus volumes,
which are inferred slice-wise), and copies the served network's weights (from ``model.pt``, or from a training
checkpoint: its EMA network if it has one, else its first network), checking that they load into the exported
``network_def``. The folder imports the ``bundle`` package (install the repo into MONAI Label's environment:
tools/monailabel_env.sh).

    python tools/export_monailabel_bundle.py --dataset synthetic --checkpoint models/model.pt \\
        --output apps/monailabel/model/monuseg_cdal
    python tools/export_monailabel_bundle.py --dataset hippocampus --checkpoint <run>/models/model.pt \\
        --output apps/monailabel/model/hippocampus_cdal --dataset_dir /data/Task04_Hippocampus \\
        --set network_def#num_channels=16 "network_def#attention_resolutions=[]" num_timesteps=2

An existing output folder is only replaced with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from monai.bundle import ConfigParser

from bundle.composer import compose

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# dataset -> (served labels, dimension of the served images)
DATASETS = {
    "synthetic": ({"0": "background", "1": "nucleus"}, 2),
    "monuseg": ({"0": "background", "1": "nucleus"}, 2),
    "cxr": ({"0": "background", "1": "lung"}, 2),
    "lidc": ({"0": "background", "1": "lesion"}, 2),
    "hippocampus": ({"0": "background", "1": "anterior", "2": "posterior"}, 3),
}


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The network state dict in ``checkpoint``: a plain state dict (model.pt) or a training checkpoint."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{checkpoint}: cannot read it as a PyTorch checkpoint ({err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{checkpoint}: expected a state dict, got {type(state).__name__}")
    if isinstance(state.get("ema_network"), dict):  # trained with EMA: the EMA is the served network
        return state["ema_network"]
    networks = state.get("networks")
    if isinstance(networks, dict) and networks and isinstance(next(iter(networks.values())), dict):
        return next(iter(networks.values()))  # the method's main network comes first
    for key in ("generator", "network", "model"):  # checkpoints of the earlier flat layout
        if isinstance(state.get(key), dict):
            return state[key]
    if not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(
            f"{checkpoint}: neither a state dict nor a training checkpoint with networks (keys: {sorted(state)[:8]})"
        )
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
    labels, dimension = DATASETS[dataset]
    methods = [CONFIGS / m if not Path(m).is_absolute() else Path(m) for m in method_configs]
    dataset_overlay = [CONFIGS / "datasets" / f"{dataset}.yaml"]
    overrides = dict(overrides or {})

    train = compose([CONFIGS / "train.yaml", *methods, *dataset_overlay, CONFIGS / "monailabel/train.yaml"], overrides)
    infer = compose(
        [CONFIGS / "inference.yaml", *methods, *dataset_overlay, CONFIGS / "monailabel/infer.yaml"], overrides
    )
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
    # keys in the configs' order (handlers attach in their order): no sorting
    ConfigParser.export_config_file(
        infer.get(), str(staging / "configs" / "inference.yaml"), fmt="yaml", sort_keys=False
    )
    ConfigParser.export_config_file(train.get(), str(staging / "configs" / "train.yaml"), fmt="yaml", sort_keys=False)
    shutil.copy2(CONFIGS / "logging.conf", staging / "configs" / "logging.conf")
    torch.save(weights, staging / "models" / "model.pt")

    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    spatial = ["*"] * dimension
    image_channels, label_channels = int(infer.get_parsed_content("image_channels")), len(labels)
    metadata["network_data_format"] = {
        "inputs": {
            "image": {
                "type": "image",
                "format": "magnitude",
                "num_channels": image_channels,
                "spatial_shape": spatial,
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": False,
                "channel_def": {"0": "R", "1": "G", "2": "B"} if image_channels == 3 else {"0": "image"},
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "labels",
                "num_channels": 1,
                "spatial_shape": spatial,
                "dtype": "uint8",
                "value_range": [0, label_channels - 1],
                "is_patch_data": False,
                "channel_def": labels,
            }
        },
    }
    metadata["monailabel"] = {
        "dataset": dataset,
        "dimension": dimension,
        "slice_wise": dimension == 3 and int(infer.get_parsed_content("spatial_dims")) == 2,
        "uncertainty": "per-pixel standard deviation of the generations' probabilities (largest over the "
        "foreground classes for multi-class models)",
        "source_checkpoint": str(checkpoint.resolve()),
        "method_configs": [str(m) for m in method_configs],
    }
    metadata["task"] = f"{metadata.get('task', '')} ({dataset}, served through MONAI Label)"
    (staging / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    staging.rename(output)
    return output


def export_shipped(bundles_dir: str | Path, names: Sequence[str] | None = None) -> list[str]:
    """Export the models the repository ships (``pretrained/<name>/model.pt`` + ``export.json`` with ``dataset``,
    ``method_configs`` and ``set``) into ``bundles_dir/<name>`` where that folder does not exist yet; returns the
    names exported. MONAI Label's app calls it at start-up, so a fresh clone serves them without training."""
    shipped = REPO / "pretrained"
    available = sorted(p.parent.name for p in shipped.glob("*/export.json"))
    if names is not None:
        unknown = sorted(set(names) - set(available))
        if unknown:
            raise ValueError(f"no shipped model {unknown} in {shipped} (available: {available})")
        available = [n for n in available if n in names]
    exported = []
    for name in available:
        target = Path(bundles_dir) / name
        if target.exists():
            continue
        manifest = json.loads((shipped / name / "export.json").read_text())
        export(
            manifest["dataset"],
            shipped / name / "model.pt",
            target,
            manifest.get("method_configs", []),
            manifest.get("set", {}),
        )
        exported.append(name)
    return exported


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--checkpoint", required=True, type=Path, help="models/model.pt or checkpoints/last.pt")
    parser.add_argument("--output", required=True, type=Path, help="the bundle folder to write (MONAI Label model)")
    parser.add_argument(
        "--method_configs",
        nargs="*",
        default=[],
        help="method (and paper) overlays the model was trained with, e.g. methods/segdiff.yaml",
    )
    parser.add_argument("--dataset_dir", default=None, help="dataset folder for fine-tuning (dataset_dir key)")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="the command-line overrides the model was trained with (values parsed as YAML), "
        "e.g. network_def#num_channels=16 num_timesteps=2",
    )
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
