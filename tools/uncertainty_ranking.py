#!/usr/bin/env python
"""Does the ensemble's uncertainty tell which images it segments badly? Spearman's rho between the per-image score
that MONAI Label's ``/activelearning/uncertain`` ranks by and the image's Dice against its reference label.

The images of the chosen subsets of a saved datalist (``<run>/eval/datalist_<dataset>_fold<k>.json``, written by
training: ``training`` / ``validation`` / ``test``) go through the served inference composition itself
(``python -m monai.bundle run`` with the given configs, on a folder of links to them), which writes each label and
uncertainty map in the input's grid; then, per image, the score (``bundle.metrics.uncertainty.
foreground_uncertainty``: the mean standard deviation of the generations inside the predicted foreground) and the
mean Dice over the foreground classes. A negative rho is what helps an annotator: the images ranked first are the
ones the model gets wrong. Writes a CSV (one row per image) and a JSON summary; prints a Markdown line.

    python tools/uncertainty_ranking.py --datalist <run>/eval/datalist_hippocampus_fold0.json \\
        --subsets validation test --output eval/uncertainty_ranking \\
        --set num_generations=5 whole_slices=true
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bundle import composer  # noqa: E402
from bundle.metrics.binary import binary_scores, confusion_counts  # noqa: E402
from bundle.metrics.uncertainty import foreground_uncertainty  # noqa: E402
from bundle.transforms.writers import label_extension, volume_file_stem  # noqa: E402

DEFAULT_CONFIGS = ["configs/inference.yaml", "configs/datasets/hippocampus.yaml"]


def _read(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


def dice_per_class(predicted: np.ndarray, truth: np.ndarray, classes: list[int]) -> list[float]:
    """Dice of each class of two label maps (the bundle's binary metric); a class in neither scores 1."""
    one_hot = [torch.stack([torch.as_tensor(m == c) for c in classes])[None].float() for m in (predicted, truth)]
    tp, fp, fn = confusion_counts(*one_hot, threshold=0.5, label_threshold=0.5)
    return binary_scores(tp, fp, fn, "dice", empty_score=1.0)[0].tolist()


def spearman(x: list[float], y: list[float]) -> dict:
    from scipy.stats import spearmanr

    result = spearmanr(x, y)
    return {"rho": float(result.statistic), "p": float(result.pvalue), "n": len(x)}


def run(args: argparse.Namespace) -> dict:
    datalist = json.loads(Path(args.datalist).read_text())
    items = [item for subset in args.subsets for item in datalist[subset]]
    if not items:
        raise SystemExit(f"{args.datalist}: no images in the subsets {args.subsets}")
    out = Path(args.output)
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    subset_of = {}
    for subset in args.subsets:
        for item in datalist[subset]:
            link = inputs / Path(item["image"]).name
            if not link.exists():
                link.symlink_to(Path(item["image"]).resolve())
            subset_of[volume_file_stem(item["image"])] = subset
    overrides = {"input_dir": inputs, "output_dir": out / "predictions", "bundle_root": out}
    overrides.update(item.partition("=")[::2] for item in args.set)
    files = [REPO / c for c in args.configs]
    start = time.perf_counter()
    if not (out / "predictions" / "masks").is_dir():
        composer.run_bundle("run", files, overrides, check=True)
    seconds = time.perf_counter() - start
    rows = []
    for item in items:
        stem = volume_file_stem(item["image"])
        ext = label_extension(item["image"])
        mask = _read(out / "predictions" / "masks" / f"{stem}{ext}")
        uncertainty = _read(out / "predictions" / "uncertainty" / f"{stem}{ext}")
        truth = _read(Path(item["label"]))
        classes = sorted(int(c) for c in np.unique(truth) if c > 0)
        dice = dice_per_class(mask, truth, classes)
        rows.append(
            {
                "image": stem,
                "subset": subset_of[stem],
                "score": foreground_uncertainty(uncertainty, mask),
                "mean_uncertainty": float(uncertainty.mean()),
                "dice_mean": float(np.mean(dice)),
                **{f"dice_{c}": d for c, d in zip(classes, dice)},
            }
        )
    with open(out / "uncertainty_vs_dice.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"configs": args.configs, "set": args.set, "datalist": str(args.datalist), "seconds": round(seconds, 1)}
    for subset in [*args.subsets, "all"]:
        chosen = [r for r in rows if subset == "all" or r["subset"] == subset]
        if len(chosen) < 3:
            continue
        summary[subset] = {
            "foreground_score": spearman([r["score"] for r in chosen], [r["dice_mean"] for r in chosen]),
            "whole_image_mean": spearman([r["mean_uncertainty"] for r in chosen], [r["dice_mean"] for r in chosen]),
            "dice_mean": float(np.mean([r["dice_mean"] for r in chosen])),
            # how much worse the k images the strategy would propose first are than the rest
            "dice_of_top_quarter_by_score": float(
                np.mean([r["dice_mean"] for r in sorted(chosen, key=lambda r: -r["score"])[: max(1, len(chosen) // 4)]])
            ),
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for subset in [*args.subsets, "all"]:
        if subset in summary:
            s = summary[subset]
            print(
                f"| {subset} | {s['foreground_score']['n']} | {s['foreground_score']['rho']:.3f} "
                f"(p = {s['foreground_score']['p']:.2g}) | {s['whole_image_mean']['rho']:.3f} "
                f"(p = {s['whole_image_mean']['p']:.2g}) | {s['dice_mean']:.3f} | {s['dice_of_top_quarter_by_score']:.3f} |"
            )
    return summary


def main(argv: list[str] | None = None) -> dict:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--datalist", required=True, help="a training run's saved datalist JSON")
    cli.add_argument("--subsets", nargs="+", default=["validation"], help="datalist subsets to rank")
    cli.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="the inference composition")
    cli.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. num_generations=5")
    cli.add_argument("--output", required=True, help="folder for the predictions, the CSV and the summary")
    args = cli.parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    return run(args)


if __name__ == "__main__":
    main()
