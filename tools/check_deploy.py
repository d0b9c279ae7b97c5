#!/usr/bin/env python
"""Export a trained model's deployable segmenter to TorchScript and ONNX and check them against the eager module.

For the model in ``<bundle_root>/models/model.pt`` (trained with the given method overlay): builds
``deploy_network_def`` from ``configs/inference.yaml``, exports it with MONAI's ``ckpt_export`` (traced) and
``onnx_export``, scores all three paths on a datalist subset with the evaluation protocol (the resized image tiled
into ``roi_size`` windows, per-image Dice of the mean at 0.5) and times one window, then prints a Markdown table
(docs/deploy.md, docs/benchmarks.md)::

    python tools/check_deploy.py --bundle_root . --eval_subset test
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from monai.bundle import ConfigParser, ckpt_export, onnx_export
from monai.inferers import SlidingWindowInferer

from bundle.metrics.binary import PerImageBinaryMetric

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle_root", type=Path, default=Path("."), help="holds models/model.pt")
    parser.add_argument("--method_configs", nargs="*", default=[], help="e.g. methods/segdiff.yaml")
    parser.add_argument("--eval_subset", default="test")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per path (median)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    root = args.bundle_root.absolute()
    methods = [str(CONFIGS / m) for m in args.method_configs]
    infer_files = [str(CONFIGS / "inference.yaml"), *methods]
    model, out = root / "models" / "model.pt", root / "models"
    common = dict(
        net_id="deploy_network_def",
        ckpt_file=str(model),
        meta_file=str(CONFIGS / "metadata.json"),
        config_file=infer_files,
        bundle_root=str(root),
    )
    ckpt_export(filepath=str(out / "model.ts"), use_trace=True, **common)
    onnx_export(filepath=str(out / "model.onnx"), **common)

    import onnxruntime

    infer = ConfigParser()
    infer.read_config(infer_files)
    infer["bundle_root"] = str(root)
    deploy = infer.get_parsed_content("deploy_network_def").eval()
    deploy.load_state_dict(torch.load(model, weights_only=True))
    scripted = torch.jit.load(str(out / "model.ts"))
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    name = session.get_inputs()[0].name
    paths = {
        "eager": deploy,
        "TorchScript": scripted,
        "ONNX (onnxruntime)": lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]),
    }

    evaluation = ConfigParser()
    evaluation.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "evaluate.yaml"), *methods])
    evaluation["bundle_root"], evaluation["eval_subset"] = str(root), args.eval_subset
    data, preprocessing = (
        evaluation.get_parsed_content("evaluate#data"),
        evaluation.get_parsed_content("validate#preprocessing"),
    )
    window = SlidingWindowInferer(roi_size=deploy.image_size, sw_batch_size=1, overlap=0.0)  # ONNX: batch 1
    metrics = {k: PerImageBinaryMetric("dice") for k in paths}
    largest = dict.fromkeys(paths, 0.0)
    channels = deploy.label_channels
    with torch.no_grad():
        for item in data:
            d = preprocessing(dict(item))
            image, label = d["image"][None].as_tensor(), d["label"][None].as_tensor()
            outputs = {k: window(image, f) for k, f in paths.items()}
            for k, value in outputs.items():
                largest[k] = max(largest[k], float((value - outputs["eager"]).abs().max()))
                metrics[k]((value[:, :channels] > 0.5).float(), label)
        x = torch.randn(1, image.shape[1], *deploy.image_size)
        seconds = {}
        for k, f in paths.items():
            f(x)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                f(x)
                times.append(time.perf_counter() - start)
            seconds[k] = statistics.median(times)
    print(
        f"{len(data)} {args.eval_subset} images; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    )
    print(
        f"| path | per-image Dice | largest difference from eager | ms per {deploy.image_size[0]}x"
        f"{deploy.image_size[1]} window (N = {deploy.num_generations}, {len(deploy.sampler.timesteps)} steps) |"
    )
    print("| --- | --- | --- | --- |")
    for k in paths:
        diff = "-" if k == "eager" else f"{largest[k]:.1e}"
        print(f"| {k} | {float(metrics[k].aggregate()):.4f} | {diff} | {seconds[k] * 1000:.0f} |")


if __name__ == "__main__":
    main()
