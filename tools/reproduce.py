#!/usr/bin/env python
"""Reproduce a paper table: train and evaluate methods on the folds of a dataset, then tabulate.

For every method and fold this runs (each as ``python -m monai.bundle run ...`` in a subprocess, logs in
``<results>/<method>/<dataset>/fold<k>/logs/``):

1. ``training`` with ``configs/train.yaml`` + ``configs/methods/<method>.yaml`` + ``configs/datasets/<dataset>.yaml``
   (+ ``configs/paper/<method>_<dataset>.yaml`` with ``--paper``, the GPU-scale reference settings, or
   ``configs/profiles/<method>_<dataset>.yaml`` with ``--profile``, the CPU reproduction profiles), bundle root
   ``<results>/<method>/<dataset>/fold<k>``; an interrupted training is resumed, a finished one (``TRAINING_DONE``)
   is kept;
2. ``evaluating`` (``configs/evaluate.yaml`` after train.yaml) on the held-out fold (``--eval_subset test``) into
   ``.../fold<k>/evaluation/`` (``metrics_per_image.csv``, ``metrics_summary.json``); a finished evaluation is read
   as it is, so re-running the script only tabulates.

Datasets with folds (a ``fold`` key in their overlay: cxr, hippocampus) get ``--fold k``; the others (monuseg,
synthetic) have a fixed split and get ``--seed <seed + k>`` instead, so their "folds" are repeated runs.

``--variants`` runs every method as a 2-D model (``2d``, the papers'), with 2.5-D context (``2.5d``:
``--context_slices k``) and as a 3-D network (``3d``: ``--spatial_dims 3``; cdal and unet only, the others are
skipped with a note); a variant's runs live in ``<results>/<method>_<variant>/...`` (2d: ``<method>``) and a
profile ``configs/profiles/<method>_<dataset>_<variant>.yaml``, when there is one, follows the method's profile.
Each run's time is kept in ``timing.json`` (the trainer's and the evaluator's own "Engine run finished" times,
training including its validations) and tabulated as minutes to train and seconds per image.

Then it writes ``<results>/tables/<dataset>_<methods>/table.{md,csv,tex}`` (per class and class mean, mean +- std over
folds, paired t-test of every method against the first; see ``bundle.reports.tables``) and logs the table as one
MLflow run in ``<results>/mlruns.db`` (where every training and evaluation run of the script is logged too).

Examples (the cDAL Hippocampus table, four folds, GPU; the CPU profiles with their variants, one held-out fold,
mean +- std over its volumes)::

    python tools/reproduce.py --methods cdal --dataset hippocampus --folds 0 1 2 3 --paper \\
        --dataset_dir /data/Task04_Hippocampus --results results
    python tools/reproduce.py --methods cdal segdiff unet --variants 2d 2.5d 3d --dataset hippocampus --folds 0 \\
        --profile --spread images --dataset_dir /data/Task04_Hippocampus --results results
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bundle import composer  # noqa: E402
from bundle.reports.tables import build_table, log_table_to_mlflow, read_run, write_tables  # noqa: E402

DONE_MARKER = "TRAINING_DONE"
TIMING_FILE = "timing.json"
VARIANTS = ("2d", "2.5d", "3d")
THREE_D_METHODS = ("cdal", "unet")
_FINISHED = re.compile(r"(\w+) - INFO - Engine run finished\. Time taken: (\d+):(\d+):(\d+(?:\.\d+)?)")


def cli_overrides(pairs: list[str]) -> list[str]:
    """``["a=1", "b#c=x"]`` -> ``["--a", "1", "--b#c", "x"]`` for the MONAI bundle CLI."""
    args = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set/--eval_set expects key=value, got {pair!r}")
        args += [f"--{key}", value]
    return args


def _overlay(kind: str, name: str) -> Path:
    try:
        return composer.overlay(kind, name)
    except ValueError as err:
        raise SystemExit(str(err)) from err


def config_files(
    method: str, dataset: str | None, paper: bool, evaluate: bool, profile: bool = False, variant: str = "2d"
) -> list[Path]:
    """train.yaml (+ evaluate.yaml), the method overlay, the dataset overlay (None: train.yaml's built-in synthetic
    data), then the paper or profile overlay of the pair (the bundle's composer); an unknown overlay name stops with
    the known ones."""
    try:
        return composer.config_files(
            "evaluating" if evaluate else "training", method, dataset, paper=paper, profile=profile, variant=variant
        )
    except ValueError as err:
        raise SystemExit(str(err)) from err


def _variant_args(variant: str, context_slices: int) -> list[str]:
    return [
        item
        for key, value in composer.variant_overrides(variant, context_slices).items()
        for item in (f"--{key}", str(value))
    ]


def _label(method: str, variant: str) -> str:
    return method if variant == "2d" else f"{method}_{variant}"


def engine_minutes(log: Path, engine: str) -> float | None:
    """Minutes of the last "Engine run finished" of ``engine`` (e.g. SegmentationTrainer) in a bundle log."""
    if not log.is_file():
        return None
    found = [m for m in _FINISHED.finditer(log.read_text(errors="replace")) if m.group(1) == engine]
    if not found:
        return None
    hours, minutes, seconds = (float(v) for v in found[-1].groups()[1:])
    return hours * 60 + minutes + seconds / 60


def _update_timing(root: Path, **values: float | None) -> None:
    path = root / TIMING_FILE
    timing = json.loads(path.read_text()) if path.is_file() else {}
    timing.update({k: v for k, v in values.items() if v is not None})
    path.write_text(json.dumps(timing, indent=2) + "\n")


def read_timing(root: Path) -> dict[str, float]:
    """``train_minutes`` and ``seconds_per_image`` of a finished run, where known."""
    path = root / TIMING_FILE
    timing = json.loads(path.read_text()) if path.is_file() else {}
    out = {}
    if "train_minutes" in timing:
        out["train_minutes"] = float(timing["train_minutes"])
    if timing.get("eval_minutes") is not None and timing.get("eval_images"):
        out["seconds_per_image"] = 60.0 * float(timing["eval_minutes"]) / int(timing["eval_images"])
    return out


def _run_bundle(run_id: str, files: list[Path], root: Path, args: list[str], log_name: str, dry_run: bool) -> None:
    cmd = composer.bundle_command(run_id, files, {"bundle_root": root}) + args
    print("$ " + " ".join(cmd), flush=True)
    if dry_run:
        return
    log = root / "logs" / log_name
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=composer.BUNDLE_ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    print(f"  {run_id} finished in {time.time() - start:.0f} s (exit {proc.returncode}), log {log}", flush=True)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{run_id} failed (exit {proc.returncode}); end of {log}:\n{tail}")


def _has_folds(dataset: str) -> bool:
    content = yaml.safe_load(_overlay("datasets", dataset).read_text()) or {}
    return "fold" in content


def _dataset_name(dataset: str) -> str:
    content = yaml.safe_load(_overlay("datasets", dataset).read_text()) or {}
    name = content.get("dataset_name", dataset)
    return name if isinstance(name, str) and not name.startswith(("$", "@")) else dataset


def run_root(options: argparse.Namespace, method: str, fold: int, variant: str = "2d") -> Path:
    return (Path(options.results) / _label(method, variant) / options.dataset / f"fold{fold}").absolute()


def run_fold(options: argparse.Namespace, method: str, fold: int, tracking_uri: str, variant: str = "2d") -> Path:
    """Train (unless done) and evaluate (unless done) one method on one fold; the evaluation folder."""
    root = run_root(options, method, fold, variant)
    eval_dir = root / "evaluation"
    if (eval_dir / "metrics_per_image.csv").is_file():
        print(f"{method} fold {fold}: reading the finished run in {eval_dir}", flush=True)
        return eval_dir
    if options.tabulate_only:
        raise SystemExit(f"{eval_dir}: no finished evaluation (metrics_per_image.csv); run without --tabulate_only")
    common = ["--tracking_uri", tracking_uri]
    if options.dataset_dir:
        common += ["--dataset_dir", str(Path(options.dataset_dir).absolute())]
    common += ["--fold", str(fold)] if _has_folds(options.dataset) else ["--seed", str(options.seed + fold)]
    common += _variant_args(variant, options.context_slices)
    common += cli_overrides(options.set)
    train_files = config_files(method, options.dataset, options.paper, False, options.profile, variant)
    if not (root / DONE_MARKER).is_file() and not options.evaluate_only:
        resume = ["--resume", "true"] if (root / "models" / "checkpoints" / "last.pt").is_file() else []
        _run_bundle("training", train_files, root, common + resume, "training.log", options.dry_run)
        if not options.dry_run:
            (root / DONE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S") + "\n")
            _update_timing(root, train_minutes=engine_minutes(root / "logs" / "training.log", "SegmentationTrainer"))
    if not (root / "models" / "model.pt").is_file() and not options.dry_run:
        raise SystemExit(f"{root / 'models' / 'model.pt'}: no trained model to evaluate")
    _run_bundle(
        "evaluating",
        config_files(method, options.dataset, options.paper, True, options.profile, variant),
        root,
        common + ["--eval_subset", options.eval_subset, "--eval_dir", str(eval_dir), *cli_overrides(options.eval_set)],
        "evaluating.log",
        options.dry_run,
    )
    if not options.dry_run:
        with open(eval_dir / "metrics_per_image.csv") as f:
            images = max(0, sum(1 for _ in f) - 1)
        minutes = engine_minutes(root / "logs" / "evaluating.log", "SupervisedEvaluator")
        _update_timing(root, eval_minutes=minutes, eval_images=images)
    return eval_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods",
        "--method",
        nargs="+",
        required=True,
        help="method overlays (configs/methods/<name>.yaml); the first is the t-test reference",
    )
    parser.add_argument("--dataset", required=True, help="dataset overlay (configs/datasets/<name>.yaml)")
    parser.add_argument("--folds", nargs="+", type=int, default=[0], help="folds (or repeats) to run")
    parser.add_argument("--results", default="results", help="results folder (runs, tables, mlruns.db)")
    parser.add_argument("--dataset_dir", help="the dataset in its original layout (default: the overlay's)")
    parser.add_argument("--paper", action="store_true", help="add configs/paper/<method>_<dataset>.yaml (GPU scale)")
    parser.add_argument(
        "--profile", action="store_true", help="add configs/profiles/<method>_<dataset>.yaml (CPU reproduction)"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=["2d"],
        help="2d (the papers'), 2.5d (--context_slices neighbours as channels), 3d (3-D networks: cdal, unet)",
    )
    parser.add_argument("--context_slices", type=int, default=1, help="neighbours on each side for the 2.5d variant")
    parser.add_argument(
        "--spread",
        choices=("folds", "images"),
        default="folds",
        help="the table's +- : std over the fold means (default) or over the images (volumes) pooled",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for training and evaluation, e.g. max_epochs=20",
    )
    parser.add_argument(
        "--eval_set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for evaluation only, e.g. num_generations=30",
    )
    parser.add_argument("--eval_subset", default="test", help="datalist subset scored (default: the held-out fold)")
    parser.add_argument("--metrics", nargs="+", default=["dice", "iou", "precision", "recall"])
    parser.add_argument(
        "--pairing",
        choices=("image", "fold"),
        default="image",
        help="t-test pairs: the same images in both methods (default) or the fold means",
    )
    parser.add_argument("--seed", type=int, default=1024, help="base seed of the repeats of fold-less datasets")
    parser.add_argument("--evaluate_only", action="store_true", help="evaluate existing models, never train")
    parser.add_argument("--tabulate_only", action="store_true", help="only read finished runs and tabulate")
    parser.add_argument(
        "--skip_missing", action="store_true", help="with --tabulate_only: leave out methods/variants not yet run"
    )
    parser.add_argument("--tracking_uri", help="MLflow tracking URI (default: sqlite:///<results>/mlruns.db)")
    parser.add_argument("--dry_run", action="store_true", help="print the bundle commands, run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    results = Path(options.results).absolute()
    results.mkdir(parents=True, exist_ok=True)
    tracking_uri = options.tracking_uri or f"sqlite:///{results / 'mlruns.db'}"
    runs, timings, labels = [], {}, []
    for method in options.methods:
        for variant in options.variants:
            if variant == "3d" and method not in THREE_D_METHODS:
                print(f"{method}: no 3-D network (3-D variants: {', '.join(THREE_D_METHODS)}); skipped", flush=True)
                continue
            label = _label(method, variant)
            if options.tabulate_only and options.skip_missing:
                missing = [
                    k
                    for k in options.folds
                    if not (run_root(options, method, k, variant) / "evaluation" / "metrics_per_image.csv").is_file()
                ]
                if missing:
                    print(f"{label}: no finished evaluation for folds {missing}; left out of the table", flush=True)
                    continue
            labels.append(label)
            fold_timings = []
            for fold in options.folds:
                eval_dir = run_fold(options, method, fold, tracking_uri, variant)
                if not options.dry_run:
                    runs.append(read_run(eval_dir, label, fold))
                    fold_timings.append(read_timing(run_root(options, method, fold, variant)))
            keys = {k for t in fold_timings for k in t}
            timings[label] = {
                k: sum(t[k] for t in fold_timings if k in t) / sum(k in t for t in fold_timings) for k in keys
            }
    if options.dry_run:
        return 0
    dataset = _dataset_name(options.dataset)
    table = build_table(runs, dataset, options.metrics, options.pairing, options.spread, timings)
    out_dir = results / "tables" / f"{options.dataset}_{'_vs_'.join(labels)}"
    paths = write_tables(table, out_dir, overwrite=True)
    run_id = log_table_to_mlflow(table, paths, tracking_uri)
    print((out_dir / "table.md").read_text())
    print(f"tables: {', '.join(str(p) for p in paths.values())}; MLflow run {run_id} in {tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
