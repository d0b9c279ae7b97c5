#!/usr/bin/env python
"""How much a recipe swings: train each method's profile with several seeds and tabulate its validation Dice.

For every method and seed this runs ``python -m monai.bundle run training`` (``configs/train.yaml`` + the method
overlay + an optional dataset overlay and ``--config`` files, ``--seed <seed>``) in
``<results>/<method>/seed<seed>/`` (a finished run, marked ``TRAINING_DONE``, is read as it is), then reads every
validation of the run from its MLflow database (``val_dice`` by epoch) and writes
``<results>/seed_spread.{md,csv,json}``:

- per run: the best validation Dice (the saved model's), the last one, the drop from best to last, the epochs;
- per method: mean, min and max over the seeds of the best Dice, their spread (max - min), and the largest drop
  from a run's best to its later validations; a recipe "holds" when the spread is below ``--max_spread`` (0.05)
  and no run falls more than ``--max_drop`` (0.03) after its best;
- the training minutes of each run (the trainer's own ``train_minutes``, validations included);
- with ``--test``: each run's saved model scored once on the held-out ``test`` subset (``run evaluating`` with
  ``configs/evaluate.yaml``, results in ``<run>/evaluation_test/``), which no selection saw.

    python tools/seed_spread.py --methods cdal segdiff unet prob_unet mose --seeds 1 2 3 --test --results results/spread
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from reproduce import DONE_MARKER, cli_overrides, config_files  # noqa: E402  (the same overlays, rules, marker)

from bundle import composer  # noqa: E402


def validation_history(db: Path) -> list[tuple[int, float]]:
    """(epoch, val_dice) of every validation logged in an MLflow SQLite database, in epoch order."""
    if not db.is_file():
        raise FileNotFoundError(f"{db}: no MLflow database (did the training run?)")
    with sqlite3.connect(db) as con:
        rows = con.execute("select step, value from metrics where key = 'val_dice' order by step").fetchall()
    history: dict[int, float] = {}
    for step, value in rows:
        history[int(step)] = float(value)
    return sorted(history.items())


def training_minutes(db: Path) -> float | None:
    """The trainer's last ``train_minutes`` record in an MLflow SQLite database (None when it logged none)."""
    with sqlite3.connect(db) as con:
        row = con.execute("select max(value) from metrics where key = 'train_minutes'").fetchone()
    return None if row is None or row[0] is None else float(row[0])


def test_dice(root: Path) -> float | None:
    """Mean Dice of the run's test evaluation (``<run>/evaluation_test/metrics_summary.json``), if it exists."""
    summary = root / "evaluation_test" / "metrics_summary.json"
    if not summary.is_file():
        return None
    return float(json.loads(summary.read_text())["metrics"]["dice"]["mean"])


def summarise_run(history: list[tuple[int, float]]) -> dict[str, float]:
    """Best, last, the epoch of the best and the largest fall from the best to any later validation."""
    if not history:
        raise ValueError("no validation in the run")
    values = [v for _, v in history]
    best_index = max(range(len(values)), key=values.__getitem__)
    later = values[best_index:]
    return {
        "best": values[best_index],
        "best_epoch": history[best_index][0],
        "last": values[-1],
        "drop_after_best": values[best_index] - min(later),
        "validations": len(values),
    }


def summarise_method(runs: dict[int, dict[str, float]], max_spread: float, max_drop: float) -> dict[str, float]:
    bests = [r["best"] for r in runs.values()]
    summary = {
        "seeds": len(bests),
        "mean": sum(bests) / len(bests),
        "min": min(bests),
        "max": max(bests),
        "spread": max(bests) - min(bests),
        "max_drop": max(r["drop_after_best"] for r in runs.values()),
    }
    summary["holds"] = bool(summary["spread"] < max_spread and summary["max_drop"] <= max_drop)
    for key in ("test_dice", "train_minutes"):
        values = [r[key] for r in runs.values() if r.get(key) is not None]
        if len(values) == len(runs):
            summary[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return summary


def _range(entry: dict | None, digits: int = 4) -> str:
    return (
        "-" if entry is None else f"{entry['mean']:.{digits}f} ({entry['min']:.{digits}f} - {entry['max']:.{digits}f})"
    )


def format_markdown(results: dict[str, dict], max_spread: float, max_drop: float) -> str:
    lines = [
        f"| method | seeds | best val Dice mean | min | max | spread (< {max_spread}) | largest drop after best "
        f"(<= {max_drop}) | holds | test Dice mean (min - max) | train minutes mean (min - max) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, entry in results.items():
        s = entry["summary"]
        lines.append(
            f"| {method} | {s['seeds']} | {s['mean']:.4f} | {s['min']:.4f} | {s['max']:.4f} | {s['spread']:.4f} | "
            f"{s['max_drop']:.4f} | {'yes' if s['holds'] else 'no'} | {_range(s.get('test_dice'))} | "
            f"{_range(s.get('train_minutes'), 1)} |"
        )
    lines += ["", "| method | seed | validations (epoch: Dice) | best | last |", "| --- | --- | --- | --- | --- |"]
    for method, entry in results.items():
        for seed, run in entry["runs"].items():
            trace = ", ".join(f"{e}: {v:.3f}" for e, v in run["history"])
            lines.append(f"| {method} | {seed} | {trace} | {run['best']:.4f} | {run['last']:.4f} |")
    return "\n".join(lines) + "\n"


def format_csv(results: dict[str, dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    keys = ("best", "best_epoch", "last", "drop_after_best", "validations", "test_dice", "train_minutes")
    writer.writerow(["method", "seed", *keys])
    for method, entry in results.items():
        for seed, run in entry["runs"].items():
            writer.writerow([method, seed] + ["" if run.get(k) is None else run[k] for k in keys])
    return out.getvalue()


def bundle_command(workflow: str, method: str, seed: int, root: Path, options: argparse.Namespace) -> list[str]:
    """``python -m monai.bundle run <workflow>`` of one run: reproduce.py's overlays, then the ``--config`` files."""
    files = config_files(method, options.dataset, False, workflow == "evaluating")
    files += [Path(c).absolute() for c in options.config]
    overrides = {"bundle_root": root, "seed": seed, "tracking_uri": f"sqlite:///{root / 'mlruns.db'}"}
    return composer.bundle_command(workflow, files, overrides) + cli_overrides(options.set)


def run_logged(cmd: list[str], log_path: Path, what: str) -> None:
    """Run one bundle command with its output in ``log_path``; stop with the log's end if it fails."""
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=composer.BUNDLE_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    print(f"  {what}: {time.time() - start:.0f} s (exit {proc.returncode})", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed; end of {log_path}:\n" + log_path.read_text()[-3000:])


def evaluate_test(method: str, seed: int, root: Path, options: argparse.Namespace) -> None:
    """Score the run's saved model once on the ``test`` subset (skipped when ``evaluation_test`` is complete)."""
    if test_dice(root) is not None:
        return
    cmd = bundle_command("evaluating", method, seed, root, options)
    cmd += ["--eval_subset", "test", "--eval_dir", str(root / "evaluation_test")]
    print("$ " + " ".join(cmd), flush=True)
    if not options.dry_run:
        run_logged(cmd, root / "evaluating_test.log", f"{method} seed {seed} test")


def train(method: str, seed: int, root: Path, options: argparse.Namespace) -> None:
    cmd = bundle_command("training", method, seed, root, options)
    print("$ " + " ".join(cmd), flush=True)
    if options.dry_run:
        return
    root.mkdir(parents=True, exist_ok=True)
    if (root / "models" / "checkpoints" / "last.pt").is_file():
        cmd += ["--resume", "true"]
    run_logged(cmd, root / "training.log", f"{method} seed {seed}")
    (root / DONE_MARKER).write_text(time.strftime("%Y-%m-%d %H:%M:%S") + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--dataset", help="dataset overlay (default: train.yaml's built-in synthetic data)")
    parser.add_argument("--config", nargs="*", default=[], help="further overlays, after the method and dataset")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", default="results/spread")
    parser.add_argument("--max_spread", type=float, default=0.05)
    parser.add_argument("--max_drop", type=float, default=0.03)
    parser.add_argument("--test", action="store_true", help="also score each run's model once on the test subset")
    parser.add_argument("--tabulate_only", action="store_true")
    parser.add_argument("--dry_run", action="store_true")
    options = parser.parse_args(argv)
    results_dir = Path(options.results).absolute()
    results: dict[str, dict] = {}
    for method in options.methods:
        runs = {}
        for seed in options.seeds:
            root = results_dir / method / f"seed{seed}"
            if not (root / DONE_MARKER).is_file():
                if options.tabulate_only:
                    raise SystemExit(f"{root}: no finished training ({DONE_MARKER}); run without --tabulate_only")
                train(method, seed, root, options)
            if options.test and not options.tabulate_only:
                evaluate_test(method, seed, root, options)
            if options.dry_run:
                continue
            history = validation_history(root / "mlruns.db")
            runs[seed] = {
                **summarise_run(history),
                "history": history,
                "test_dice": test_dice(root),
                "train_minutes": training_minutes(root / "mlruns.db"),
            }
        if runs:
            results[method] = {"runs": runs, "summary": summarise_method(runs, options.max_spread, options.max_drop)}
    if options.dry_run:
        return 0
    results_dir.mkdir(parents=True, exist_ok=True)
    markdown = format_markdown(results, options.max_spread, options.max_drop)
    (results_dir / "seed_spread.md").write_text(markdown)
    (results_dir / "seed_spread.csv").write_text(format_csv(results))
    (results_dir / "seed_spread.json").write_text(json.dumps(results, indent=2) + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
