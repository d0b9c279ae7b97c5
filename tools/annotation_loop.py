#!/usr/bin/env python
"""A simulated annotation round: does labelling the images the ensemble is most uncertain about help more than
labelling images at random? (issue 14; docs/monailabel.md)

Per seed, on one fold of MSD Task04 Hippocampus (the fold's held-out volumes are never trained on):

1. ``initial`` volumes drawn at random from the fold's training volumes are "labelled"; a cDAL model is trained on
   them (``configs/profiles/cdal_hippocampus.yaml``, ``initial_iterations`` iterations).
2. A pool of ``pool`` further training volumes is "unlabelled": the served inference composition scores each one
   exactly as MONAI Label's ``/activelearning/uncertain`` does (``bundle.metrics.uncertainty.
   foreground_uncertainty``, the mean std of the generations inside the predicted foreground).
3. Two annotators each label ``k`` pool volumes: the ``k`` most uncertain, or ``k`` drawn at random. Each model is
   fine-tuned from the initial one (``--init_weights``: the networks, with fresh optimizers) on the ``initial + k``
   volumes for ``finetune_iterations`` iterations, with the same seed.
4. The initial and both fine-tuned models are scored on the same ``held_out`` volumes of the fold's test split
   (fast protocol, mean Dice over anterior and posterior per volume).

Nothing is tuned on the held-out volumes. Writes ``<output>/seed<k>/result.json`` per seed, ``summary.json`` and
``per_volume.csv``; prints a Markdown table. Seeds can run as separate processes (``--seeds 0``, ``--seeds 1``; then
``--summarise`` alone).

    python tools/annotation_loop.py --dataset_dir ../shared/data/hippocampus/Task04_Hippocampus \\
        --output /work/results/annotation_loop --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import uncertainty_ranking  # noqa: E402

from bundle import composer  # noqa: E402
from bundle.data.hippocampus import build_hippocampus_datalist  # noqa: E402
from bundle.files import write_text_atomic  # noqa: E402

TRAIN_CONFIGS = composer.config_files("training", "cdal", "hippocampus", profile=True)
INFER_CONFIGS = composer.config_files("inference", dataset="hippocampus")
STRATEGIES = ("uncertain", "random")


def _write_json(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")  # creates the folder


def train(
    run_dir: Path, labelled: list[dict], validation: list[dict], args, seed: int, iterations: int, init: Path | None
):
    """One training run of the CPU cDAL profile on exactly ``labelled`` (validated once, at the end)."""
    model = run_dir / "models" / "model.pt"
    if model.is_file():
        return model
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run of this script: start that model again
    run_dir.mkdir(parents=True)
    datalist = run_dir / "labelled.json"
    _write_json(datalist, {"training": labelled, "validation": validation, "test": []})
    epochs = max(1, iterations // args.epoch_length)
    overrides = {
        "bundle_root": run_dir,
        "dataset_dir": args.dataset_dir,
        "datalist": f"$__import__('json').loads(open({str(datalist)!r}).read())",
        "max_epochs": epochs,
        "epoch_length": args.epoch_length,
        "val_interval": epochs,
        "seed": args.seed_base + seed,
        "tracking_uri": f"sqlite:///{run_dir / 'mlruns.db'}",
    }
    if init is not None:
        overrides["init_weights"] = init
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        composer.run_bundle("training", TRAIN_CONFIGS, overrides, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f"  trained {run_dir.name} on {len(labelled)} volumes in {time.perf_counter() - start:.0f} s", flush=True)
    return model


def infer(out: Path, model: Path, items: list[dict], subset: str, args) -> dict[str, dict]:
    """Score and Dice per volume through the served inference composition (tools/uncertainty_ranking.py)."""
    out.mkdir(parents=True, exist_ok=True)
    datalist = out / "items.json"
    _write_json(datalist, {subset: items})
    if not (out / "uncertainty_vs_dice.csv").is_file():
        uncertainty_ranking.main(
            [
                "--datalist", str(datalist), "--subsets", subset, "--configs", *map(str, INFER_CONFIGS),
                "--output", str(out), "--set", f"checkpoint={model}",
                f"num_generations={args.num_generations}", "whole_slices=true",
            ]
        )  # fmt: skip
    with open(out / "uncertainty_vs_dice.csv") as f:
        return {
            row["image"]: {"score": float(row["score"]), "dice": float(row["dice_mean"])} for row in csv.DictReader(f)
        }


def run_seed(seed: int, datalist: dict, args) -> dict:
    out = Path(args.output) / f"seed{seed}"
    result_path = out / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    rng = np.random.default_rng(seed)
    candidates = datalist["training"]
    order = rng.permutation(len(candidates))
    initial = [candidates[i] for i in order[: args.initial]]
    pool = [candidates[i] for i in order[args.initial : args.initial + args.pool]]
    validation = datalist["validation"][: args.validation]
    held_out = held_out_volumes(datalist, args)
    print(f"seed {seed}: {len(initial)} labelled, pool {len(pool)}, held-out {len(held_out)}", flush=True)

    model0 = train(out / "initial", initial, validation, args, seed, args.initial_iterations, None)
    pool_scores = infer(out / "initial" / "pool", model0, pool, "pool", args)
    held0 = infer(out / "initial" / "held_out", model0, held_out, "test", args)
    stems = [uncertainty_ranking.volume_file_stem(item["image"]) for item in pool]
    picks = {
        "uncertain": sorted(range(len(pool)), key=lambda i: -pool_scores[stems[i]]["score"])[: args.k],
        "random": [int(i) for i in rng.choice(len(pool), size=args.k, replace=False)],
    }
    result = {
        "seed": seed,
        "initial": [uncertainty_ranking.volume_file_stem(i["image"]) for i in initial],
        "pool": pool_scores,
        "pool_rho": uncertainty_ranking.spearman(
            [pool_scores[s]["score"] for s in stems], [pool_scores[s]["dice"] for s in stems]
        ),
        "held_out": {"initial": held0},
        "picked": {},
    }
    last = out / "initial" / "models" / "checkpoints" / "last.pt"
    for strategy in STRATEGIES:
        chosen = [pool[i] for i in picks[strategy]]
        result["picked"][strategy] = {
            stems[i]: {"score": pool_scores[stems[i]]["score"], "dice_before": pool_scores[stems[i]]["dice"]}
            for i in picks[strategy]
        }
        model = train(out / strategy, initial + chosen, validation, args, seed, args.finetune_iterations, last)
        result["held_out"][strategy] = infer(out / strategy / "held_out", model, held_out, "test", args)
    result["mean_dice"] = {
        name: float(np.mean([v["dice"] for v in scores.values()])) for name, scores in result["held_out"].items()
    }
    _write_json(result_path, result)
    print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in result["mean_dice"].items()), flush=True)
    return result


def held_out_volumes(datalist: dict, args) -> list[dict]:
    """The same ``held_out`` test volumes for every seed (a fixed draw from the fold's test split)."""
    test = datalist["test"]
    order = np.random.default_rng(12345).permutation(len(test))[: args.held_out]
    return [test[i] for i in sorted(order)]


def summarise(output: Path) -> dict:
    from scipy.stats import ttest_rel, wilcoxon

    results = [json.loads(p.read_text()) for p in sorted(output.glob("seed*/result.json"))]
    if not results:
        raise SystemExit(f"{output}: no seed*/result.json yet")
    rows = []
    for r in results:
        for volume, initial in r["held_out"]["initial"].items():
            rows.append(
                {
                    "seed": r["seed"],
                    "volume": volume,
                    "initial": initial["dice"],
                    **{s: r["held_out"][s][volume]["dice"] for s in STRATEGIES},
                }
            )
    with open(output / "per_volume.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    per_seed = [{"seed": r["seed"], **r["mean_dice"], "pool_rho": r["pool_rho"]["rho"]} for r in results]
    gains = [s["uncertain"] - s["random"] for s in per_seed]
    paired = np.array([[row["uncertain"], row["random"]] for row in rows])
    summary = {
        "seeds": per_seed,
        "mean": {k: float(np.mean([s[k] for s in per_seed])) for k in ("initial", *STRATEGIES)},
        "std": {k: float(np.std([s[k] for s in per_seed], ddof=1)) if len(per_seed) > 1 else None
                for k in ("initial", *STRATEGIES)},
        "uncertain_minus_random": {
            "per_seed": gains,
            "mean": float(np.mean(gains)),
            "seeds_better": int(sum(g > 0 for g in gains)),
            # every (seed, held-out volume) pair: the same volume scored by both fine-tuned models
            "paired_t_p": float(ttest_rel(paired[:, 0], paired[:, 1]).pvalue),
            "wilcoxon_p": float(wilcoxon(paired[:, 0], paired[:, 1]).pvalue),
            "pairs": len(rows),
        },
        "picked_dice_before": {
            s: float(np.mean([v["dice_before"] for r in results for v in r["picked"][s].values()])) for s in STRATEGIES
        },
    }  # fmt: skip
    _write_json(output / "summary.json", summary)
    print("| seed | initial | + k uncertain | + k random | uncertain - random | pool rho |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s, g in zip(per_seed, gains):
        print(
            f"| {s['seed']} | {s['initial']:.4f} | {s['uncertain']:.4f} | {s['random']:.4f} | {g:+.4f} | {s['pool_rho']:.2f} |"
        )
    d = summary["uncertain_minus_random"]
    print(
        f"mean gain {d['mean']:+.4f} ({d['seeds_better']}/{len(gains)} seeds better; paired t p = {d['paired_t_p']:.2g}, "
        f"Wilcoxon p = {d['wilcoxon_p']:.2g} over {d['pairs']} seed x volume pairs); Dice of the picked pool volumes "
        f"before labelling: uncertain {summary['picked_dice_before']['uncertain']:.3f}, random "
        f"{summary['picked_dice_before']['random']:.3f}"
    )
    return summary


def main(argv: list[str] | None = None) -> dict | None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--dataset_dir", help="Task04_Hippocampus in its MSD layout")
    cli.add_argument("--output", required=True)
    cli.add_argument("--fold", type=int, default=0)
    cli.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    cli.add_argument("--seed_base", type=int, default=100, help="training seed = seed_base + seed")
    cli.add_argument("--initial", type=int, default=4, help="volumes labelled before the round")
    cli.add_argument("--pool", type=int, default=20, help="unlabelled volumes the strategies choose from")
    cli.add_argument("--k", type=int, default=4, help="volumes labelled in the round")
    cli.add_argument("--validation", type=int, default=2, help="validation volumes (one validation at the end)")
    cli.add_argument("--held_out", type=int, default=20, help="test-fold volumes that score every model")
    cli.add_argument("--initial_iterations", type=int, default=240)
    cli.add_argument("--finetune_iterations", type=int, default=150)
    cli.add_argument("--epoch_length", type=int, default=30)
    cli.add_argument("--num_generations", type=int, default=3, help="generations per volume (scores and Dice)")
    cli.add_argument("--summarise", action="store_true", help="only summarise the seeds already run")
    args = cli.parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    output = Path(args.output)
    if not args.summarise:
        if not args.dataset_dir:
            cli.error("--dataset_dir is required to run seeds")
        args.dataset_dir = Path(args.dataset_dir).resolve()
        datalist = build_hippocampus_datalist(args.dataset_dir, fold=args.fold)
        for seed in args.seeds:
            run_seed(seed, datalist, args)
    return summarise(output)


if __name__ == "__main__":
    main()
