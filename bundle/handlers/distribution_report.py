"""Evaluation results of the distribution metrics: ``distribution_metrics.json`` (+ a per-image CSV).

The per-image metrics (GED, HM-IoU, Dice, ...) are summarised as mean, std and n over the images where they are
finite (NaN-aware, as their ``aggregate``); pooled metrics (ECE over all pixels) have no per-image value and are
reported as the evaluator's aggregated value. Existing files are replaced only with ``overwrite``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from bundle.files import atomic_output, write_text_atomic
from bundle.handlers.reports import summarise
from bundle.runtime import as_bool

__all__ = ["DistributionReportWriter"]


def _name(item: dict) -> str:
    image = item.get("image")
    meta = getattr(image, "meta", None) or {}
    name = meta.get("filename_or_obj", "")
    return str(name[0] if isinstance(name, (list, tuple)) else name)


class DistributionReportWriter:
    """Evaluator handler writing ``<output_dir>/distribution_metrics.json`` and ``distribution_per_image.csv``.

    Args:
        output_dir: results folder.
        per_image_metrics: names of attached metrics with one value per image (``metric_details``).
        pooled_metrics: names of attached metrics that only have a dataset value (e.g. ECE).
        settings: extra facts written into the JSON (method, number of samples, conventions, ...).
        overwrite: replace existing result files.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        per_image_metrics: Sequence[str],
        pooled_metrics: Sequence[str] = (),
        settings: dict | None = None,
        overwrite: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.per_image_metrics = list(per_image_metrics)
        self.pooled_metrics = list(pooled_metrics)
        self.settings = dict(settings or {})
        self.overwrite = as_bool(overwrite, "overwrite")
        self.json_path = self.output_dir / "distribution_metrics.json"
        self.csv_path = self.output_dir / "distribution_per_image.csv"
        self._names: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._check)
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._names.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _check(self, engine: Engine) -> None:
        existing = [p for p in (self.json_path, self.csv_path) if p.exists()]
        if existing and not self.overwrite:
            raise FileExistsError(
                f"{existing[0]}: results exist already; pass '--overwrite true' or another output_dir"
            )

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        self._names.extend(_name(item) for item in (output if isinstance(output, list) else [output]))

    def _write(self, engine: Engine) -> None:
        details = getattr(engine.state, "metric_details", {}) or {}
        rows = len(self._names)
        columns = {}
        summary: dict[str, dict] = {}
        for name in self.per_image_metrics:
            if name not in details:
                raise KeyError(f"metric {name!r} has no per-image values (attached: {sorted(details)})")
            values = torch.as_tensor(details[name]).float().cpu().numpy().reshape(-1)[:rows]
            columns[name] = values
            summary[name] = summarise(values)
        for name in self.pooled_metrics:
            summary[name] = {"value": float(engine.state.metrics[name]), "pooled": True}
        with atomic_output(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", *columns])
            for r in range(rows):
                writer.writerow([self._names[r], *(f"{columns[c][r]:.6f}" for c in columns)])
        report = {"num_images": rows, "settings": self.settings, "metrics": summary}
        write_text_atomic(self.json_path, json.dumps(report, indent=2, default=_jsonable) + "\n")


def _jsonable(value: object) -> object:
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.tolist()
    return str(value)
