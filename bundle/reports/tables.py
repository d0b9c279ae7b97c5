"""Paper-style result tables from finished evaluation runs: mean +- std over folds and paired t-tests.

Input: one evaluation folder per (method, fold) holding the ``metrics_per_image.csv`` that
``bundle.handlers.reports.SegmentationReportWriter`` writes (columns ``image``, then ``<metric>`` for one
class or ``<metric>_<class>`` per class). For every method and table column:

- the fold score is the mean over that fold's images (a ``<metric>_mean`` column is first averaged over the
  classes of each image, as the writer's ``metric_mean`` summary);
- the cell is the mean and the sample standard deviation (ddof = 1) of the fold scores; with one fold the std
  is undefined and shown as "-". With ``spread="images"`` the cell is instead the mean and std (ddof = 1) over
  all per-image scores pooled over the folds (mean +- std over volumes, for a single held-out fold).

Optional per-method timings (``timings[method] = {"train_minutes": ..., "seconds_per_image": ...}``) become the
table's last two columns.

Paired t-tests (``scipy.stats.ttest_rel``) compare every other method with the first (reference) method, per
column. ``pairing="image"`` (default) pairs the per-image scores of the same image file in the same fold, pooled
over all folds (the images must be the same for both methods); ``pairing="fold"`` pairs the fold scores
(needs at least 2 folds; weak with 3-4 folds). Images with a NaN score in either method are left out.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import ttest_rel

from bundle.files import write_text_atomic

__all__ = [
    "RunResult",
    "Cell",
    "PairedTest",
    "ResultsTable",
    "find_metrics_file",
    "read_run",
    "build_table",
    "format_markdown",
    "format_csv",
    "format_latex",
    "write_tables",
    "log_table_to_mlflow",
]

METRIC_LABELS = {"dice": "Dice", "iou": "IoU", "precision": "Precision", "recall": "Recall"}
PAIRINGS = ("image", "fold")
SPREADS = ("folds", "images")
TIMING_LABELS = {"train_minutes": "Train (min)", "seconds_per_image": "s / image"}
PLUS_MINUS_TEX = r" \pm "


@dataclass
class RunResult:
    """Per-image scores of one method on one fold: ``scores[column]`` is aligned with ``images`` (file names)."""

    method: str
    fold: int
    images: list[str]
    scores: dict[str, np.ndarray]
    source: Path


@dataclass
class Cell:
    """One table cell: mean and std over folds of the fold scores."""

    mean: float
    std: float
    fold_values: list[float]
    n_images: int


@dataclass
class PairedTest:
    """``method_b - method_a`` on one column: mean difference, t statistic, two-sided p-value, number of pairs."""

    column: str
    method_a: str
    method_b: str
    mean_difference: float
    statistic: float
    p_value: float
    n: int
    pairing: str


@dataclass
class ResultsTable:
    """Everything the writers need: ``cells[(method, column)]``, ``columns`` as (key, label), the tests."""

    dataset: str
    methods: list[str]
    folds: list[int]
    columns: list[tuple[str, str]]
    cells: dict[tuple[str, str], Cell]
    tests: list[PairedTest] = field(default_factory=list)
    pairing: str = "image"
    spread: str = "folds"
    timings: dict[str, dict[str, float]] = field(default_factory=dict)

    def timing_keys(self) -> list[str]:
        """The timing columns present for at least one method, in a fixed order."""
        return [k for k in TIMING_LABELS if any(k in t for t in self.timings.values())]


def find_metrics_file(run_dir: str | os.PathLike) -> Path:
    """``metrics_per_image.csv`` in ``run_dir``, ``run_dir/evaluation/`` or the one ``run_dir/eval/evaluation_*/``."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / "metrics_per_image.csv", run_dir / "evaluation" / "metrics_per_image.csv"):
        if candidate.is_file():
            return candidate
    found = sorted(run_dir.glob("eval/evaluation_*/metrics_per_image.csv"))
    if len(found) == 1:
        return found[0]
    problem = (
        "holds no metrics_per_image.csv (is the run finished?)"
        if not found
        else (f"holds {len(found)} evaluations ({', '.join(str(p.parent.name) for p in found)}); name one")
    )
    raise FileNotFoundError(f"{run_dir}: {problem}")


def read_run(run_dir: str | os.PathLike, method: str, fold: int) -> RunResult:
    """Read one finished evaluation (see :func:`find_metrics_file`); errors name the file."""
    path = find_metrics_file(run_dir)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "image" not in rows[0]:
        raise ValueError(f"{path}: expected a header starting with 'image' and at least one row")
    columns = [c for c in rows[0] if c != "image"]
    try:
        scores = {c: np.array([float(r[c]) for r in rows]) for c in columns}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: non-numeric score ({err})") from None
    images = [os.path.basename(r["image"]) or f"row{i}" for i, r in enumerate(rows)]
    return RunResult(method=method, fold=int(fold), images=images, scores=scores, source=path)


def _columns_of(run: RunResult, metrics: Sequence[str]) -> list[tuple[str, str]]:
    """Table columns present in a run: per metric its classes, then ``<metric>_mean`` when there are several."""
    columns = []
    for metric in metrics:
        label = METRIC_LABELS.get(metric, metric)
        if metric in run.scores:
            columns.append((metric, label))
            continue
        classes = [c for c in run.scores if c.startswith(metric + "_") and c != metric + "_mean"]
        columns += [(c, f"{label} {c[len(metric) + 1 :]}") for c in classes]
        if len(classes) > 1:
            columns.append((metric + "_mean", f"{label} mean"))
    return columns


def _per_image(run: RunResult, column: str) -> np.ndarray:
    if column in run.scores:
        return run.scores[column]
    metric = column[: -len("_mean")]
    stacked = np.stack([v for c, v in run.scores.items() if c.startswith(metric + "_") and c != column], axis=1)
    with warnings.catch_warnings():  # an image whose classes are all NaN stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(stacked, axis=1)


def _paired(a: list[RunResult], b: list[RunResult], column: str, pairing: str) -> tuple[np.ndarray, np.ndarray]:
    if pairing == "fold":
        folds_b = {r.fold: r for r in b}
        common = [r for r in a if r.fold in folds_b]
        return (
            np.array([np.nanmean(_per_image(r, column)) for r in common]),
            np.array([np.nanmean(_per_image(folds_b[r.fold], column)) for r in common]),
        )
    xs, ys = [], []
    by_fold = {r.fold: r for r in b}
    for run_a in a:
        run_b = by_fold.get(run_a.fold)
        if run_b is None:
            continue
        index_b = {name: i for i, name in enumerate(run_b.images)}
        missing = [n for n in run_a.images if n not in index_b]
        if missing or len(index_b) != len(run_a.images):
            raise ValueError(
                f"fold {run_a.fold}: {run_a.source} and {run_b.source} scored different images "
                f"(e.g. {missing[0] if missing else 'extra images in the second'}); cannot pair them"
            )
        values_a, values_b = _per_image(run_a, column), _per_image(run_b, column)
        xs += list(values_a)
        ys += [values_b[index_b[n]] for n in run_a.images]
    return np.array(xs), np.array(ys)


def build_table(
    runs: Sequence[RunResult],
    dataset: str,
    metrics: Sequence[str] = ("dice", "iou", "precision", "recall"),
    pairing: str = "image",
    spread: str = "folds",
    timings: dict[str, dict[str, float]] | None = None,
) -> ResultsTable:
    """Aggregate runs (one per method and fold) into a :class:`ResultsTable`; the first method is the reference.

    Raises:
        ValueError: no runs, a method/fold given twice, methods with different columns or folds, unknown pairing,
            or image-paired methods that scored different images.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, got {spread!r}")
    if not runs:
        raise ValueError("no finished runs to tabulate")
    methods: list[str] = list(dict.fromkeys(r.method for r in runs))
    by_method = {m: sorted((r for r in runs if r.method == m), key=lambda r: r.fold) for m in methods}
    folds = [r.fold for r in by_method[methods[0]]]
    columns = _columns_of(by_method[methods[0]][0], metrics)
    if not columns:
        raise ValueError(f"{runs[0].source}: none of the metrics {list(metrics)} is in it")
    for method, method_runs in by_method.items():
        if len({r.fold for r in method_runs}) != len(method_runs):
            raise ValueError(f"method {method!r} has the same fold more than once")
        if [r.fold for r in method_runs] != folds:
            raise ValueError(f"method {method!r} has folds {[r.fold for r in method_runs]}, {methods[0]!r} {folds}")
        for run in method_runs:
            if _columns_of(run, metrics) != columns:
                raise ValueError(f"{run.source}: columns differ from {by_method[methods[0]][0].source}")
    cells = {}
    for method, method_runs in by_method.items():
        for key, _ in columns:
            fold_values = [float(np.nanmean(_per_image(r, key))) for r in method_runs]
            mean = float(np.mean(fold_values))
            std = float(np.std(fold_values, ddof=1)) if len(fold_values) > 1 else math.nan
            if spread == "images":
                pooled = np.concatenate([_per_image(r, key) for r in method_runs])
                pooled = pooled[np.isfinite(pooled)]
                mean = float(pooled.mean()) if len(pooled) else math.nan
                std = float(np.std(pooled, ddof=1)) if len(pooled) > 1 else math.nan
            cells[(method, key)] = Cell(mean, std, fold_values, sum(len(r.images) for r in method_runs))
    tests = []
    for other in methods[1:]:
        for key, _ in columns:
            a, b = _paired(by_method[methods[0]], by_method[other], key, pairing)
            keep = np.isfinite(a) & np.isfinite(b)
            a, b = a[keep], b[keep]
            if len(a) >= 2 and not np.all(a - b == (a - b)[0]):
                result = ttest_rel(b, a)
                statistic, p_value = float(result.statistic), float(result.pvalue)
            else:  # fewer than 2 pairs, or constant differences: the t statistic is undefined
                statistic = p_value = math.nan
            diff = float(np.mean(b - a)) if len(a) else math.nan
            tests.append(PairedTest(key, methods[0], other, diff, statistic, p_value, int(len(a)), pairing))
    timings = {m: dict(v) for m, v in (timings or {}).items() if m in methods}
    return ResultsTable(dataset, methods, folds, columns, cells, tests, pairing, spread, timings)


def _value(x: float, digits: int = 3) -> str:
    return "-" if not math.isfinite(x) else f"{x:.{digits}f}"


def _p(x: float) -> str:
    return "-" if not math.isfinite(x) else (f"{x:.3g}" if x >= 1e-3 else f"{x:.2e}")


def _cell(cell: Cell, plus_minus: str) -> str:
    return _value(cell.mean) if not math.isfinite(cell.std) else f"{_value(cell.mean)}{plus_minus}{_value(cell.std)}"


def _timing_values(table: ResultsTable, method: str) -> list[str]:
    timing = table.timings.get(method, {})
    digits = {"train_minutes": 1, "seconds_per_image": 2}
    return [_value(timing.get(k, math.nan), digits[k]) for k in table.timing_keys()]


def _caption(table: ResultsTable) -> str:
    folds = ", ".join(str(f) for f in table.folds)
    if table.spread == "images":
        where = f"fold {folds}" if len(table.folds) == 1 else f"folds {folds}"
        return f"{table.dataset}: mean ± std (ddof 1) over the images (volumes) of {where}."
    if len(table.folds) == 1:
        return f"{table.dataset}: mean over the images of fold {folds} (one fold: no std over folds)."
    return f"{table.dataset}: mean ± std (ddof 1) over folds {folds} of the per-fold mean over images."


def _pairing_text(table: ResultsTable) -> str:
    if table.pairing == "image":
        return "paired over the images of all folds (same image, same fold)"
    return "paired over the fold means"


def format_markdown(table: ResultsTable) -> str:
    """The table and its t-tests as GitHub Markdown."""
    labels = [label for _, label in table.columns] + [TIMING_LABELS[k] for k in table.timing_keys()]
    lines = [
        f"**{_caption(table)}**",
        "",
        "| Method | " + " | ".join(labels) + " |",
        "| --- |" + " --- |" * len(labels),
    ]
    for method in table.methods:
        values = [_cell(table.cells[(method, key)], " ± ") for key, _ in table.columns]
        values += _timing_values(table, method)
        lines.append(f"| {method} | " + " | ".join(values) + " |")
    if table.tests:
        lines += [
            "",
            f"Paired t-test (scipy.stats.ttest_rel, two-sided), {_pairing_text(table)}:",
            "",
            "| Comparison | Metric | Mean difference | t | p | Pairs |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        label_of = dict(table.columns)
        for t in table.tests:
            lines.append(
                f"| {t.method_b} − {t.method_a} | {label_of[t.column]} | {_value(t.mean_difference, 4)} | "
                f"{_value(t.statistic, 3)} | {_p(t.p_value)} | {t.n} |"
            )
    return "\n".join(lines) + "\n"


def format_csv(table: ResultsTable) -> str:
    """One row per method: folds, images, ``<column>_mean``/``_std`` and, for compared methods, ``<column>_p``."""
    header = ["dataset", "method", "folds", "n_images"]
    for key, _ in table.columns:
        header += [f"{key}_mean", f"{key}_std", f"{key}_folds", f"{key}_p"]
    header += [*table.timing_keys(), "compared_with", "pairing", "spread"]
    p_of = {(t.method_b, t.column): t.p_value for t in table.tests}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for method in table.methods:
        first = table.cells[(method, table.columns[0][0])]
        row: list[str] = [table.dataset, method, " ".join(str(f) for f in table.folds), str(first.n_images)]
        for key, _ in table.columns:
            cell = table.cells[(method, key)]
            p = p_of.get((method, key), math.nan)
            row += [
                f"{cell.mean:.6f}",
                "" if math.isnan(cell.std) else f"{cell.std:.6f}",
                " ".join(f"{v:.6f}" for v in cell.fold_values),
                "" if math.isnan(p) else f"{p:.6g}",
            ]
        compared = method != table.methods[0] and bool(table.tests)
        timing = table.timings.get(method, {})
        row += ["" if k not in timing else f"{timing[k]:.3f}" for k in table.timing_keys()]
        row += [table.methods[0] if compared else "", table.pairing if compared else "", table.spread]
        writer.writerow(row)
    return out.getvalue()


def _tex(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(char, escaped)
    return text


def format_latex(table: ResultsTable) -> str:
    """A booktabs ``table`` environment; t-test p-values in a second tabular under it."""
    labels = [_tex(label) for _, label in table.columns]
    timing_labels = [_tex(TIMING_LABELS[k]) for k in table.timing_keys()]
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{{_tex(_caption(table))}}}",
        r"\begin{tabular}{l" + "c" * (len(labels) + len(timing_labels)) + "}",
        r"\toprule",
        "Method & " + " & ".join(labels + timing_labels) + r" \\",
        r"\midrule",
    ]
    for method in table.methods:
        values = ["$" + _cell(table.cells[(method, key)], PLUS_MINUS_TEX) + "$" for key, _ in table.columns]
        values += _timing_values(table, method)
        lines.append(f"{_tex(method)} & " + " & ".join(values) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.tests:
        lines += [
            r"\par\medskip",
            f"Paired t-test, {_tex(_pairing_text(table))}: $p$-values.\\par",
            r"\begin{tabular}{l" + "c" * len(labels) + "}",
            r"\toprule",
            "Comparison & " + " & ".join(labels) + r" \\",
            r"\midrule",
        ]
        for other in table.methods[1:]:
            ps = {t.column: t.p_value for t in table.tests if t.method_b == other}
            values = [_p(ps.get(key, math.nan)) for key, _ in table.columns]
            lines.append(f"{_tex(other)} vs {_tex(table.methods[0])} & " + " & ".join(values) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def write_tables(table: ResultsTable, output_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` and ``table.tex`` into ``output_dir``; existing files need ``overwrite``."""
    output_dir = Path(output_dir)
    contents = {"md": format_markdown(table), "csv": format_csv(table), "tex": format_latex(table)}
    paths = {kind: output_dir / f"table.{kind}" for kind in contents}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]}: exists already; pass --overwrite or another output folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    for kind, path in paths.items():
        write_text_atomic(path, contents[kind])
    return paths


def log_table_to_mlflow(
    table: ResultsTable,
    paths: dict[str, Path],
    tracking_uri: str,
    experiment_name: str = "diffseg",
    run_name: str | None = None,
) -> str:
    """Log the cells (``<method>/<column>_mean|_std``), p-values and the table files as one MLflow run; its id."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = (Path(tracking_uri[len("sqlite:///") :]).parent / "mlruns").absolute().as_uri()
        experiment_id = client.create_experiment(experiment_name, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    name = run_name or f"table_{table.dataset}_{'_vs_'.join(table.methods)}"
    run = client.create_run(experiment_id, run_name=name)
    run_id = run.info.run_id
    params = {
        "dataset": table.dataset,
        "methods": ",".join(table.methods),
        "folds": ",".join(str(f) for f in table.folds),
        "pairing": table.pairing,
        "spread": table.spread,
    }
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for (method, key), cell in table.cells.items():
        client.log_metric(run_id, f"{method}/{key}_mean", cell.mean)
        if math.isfinite(cell.std):
            client.log_metric(run_id, f"{method}/{key}_std", cell.std)
    for method, timing in table.timings.items():
        for key, value in timing.items():
            if math.isfinite(value):
                client.log_metric(run_id, f"{method}/{key}", value)
    for t in table.tests:
        if math.isfinite(t.p_value):
            client.log_metric(run_id, f"p/{t.method_b}_vs_{t.method_a}/{t.column}", t.p_value)
    for path in paths.values():
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id
