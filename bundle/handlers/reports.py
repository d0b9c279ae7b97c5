"""Evaluation results on disk: one CSV row per image and a JSON summary (mean, std, n per metric)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from bundle.files import atomic_output, write_text_atomic
from bundle.runtime import as_bool


def _filename(item: dict) -> str:
    image = item.get("image")
    meta = getattr(image, "meta", None) or item.get("image_meta_dict") or {}
    name = meta.get("filename_or_obj", "")
    return str(name[0] if isinstance(name, (list, tuple)) else name)


def summarise(values: np.ndarray) -> dict[str, float | int]:
    """Mean, std (population) and count of the finite values."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "n": int(finite.size)}


class SegmentationReportWriter:
    """Evaluator handler writing ``<output_dir>/metrics_per_image.csv`` and ``<output_dir>/metrics_summary.json``.

    It reads the per-image values that ``IgniteMetricHandler(save_details=True)`` keeps in
    ``engine.state.metric_details`` (one row per image, one column per class channel) and the image file names
    from the outputs' metadata. Existing files are replaced only when ``overwrite`` is true.

    Args:
        output_dir: results folder.
        metric_names: names of the attached metrics to report, as registered with the evaluator.
        class_names: names of the label channels; when None, the ``"class_names"`` that the outputs carry (as
            ``bundle.transforms.volume.VoteArgmaxd`` sets them), else ``class_0``, ...; one channel gives plain
            columns.
        overwrite: replace results already in ``output_dir``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        metric_names: Sequence[str],
        class_names: Sequence[str] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.metric_names = list(metric_names)
        self.class_names = list(class_names) if class_names else None
        self.overwrite = as_bool(overwrite, "overwrite")
        self.csv_path = self.output_dir / "metrics_per_image.csv"
        self.json_path = self.output_dir / "metrics_summary.json"
        self._names: list[str] = []
        self._output_class_names: list[str] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._check_outputs)
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._names.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _check_outputs(self, engine: Engine) -> None:
        existing = [p for p in (self.csv_path, self.json_path) if p.exists()]
        if existing and not self.overwrite:
            raise FileExistsError(
                f"{existing[0]}: results exist already; pass '--overwrite true' or another output_dir"
            )

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            self._names.append(_filename(item))
            if self._output_class_names is None and isinstance(item, dict) and item.get("class_names"):
                self._output_class_names = [str(n) for n in item["class_names"]]

    def _columns(self, channels: int) -> list[str]:
        if channels == 1:
            return [""]
        names = self.class_names or self._output_class_names or [f"class_{c}" for c in range(channels)]
        if len(names) != channels:
            raise ValueError(f"{len(names)} class names {names} for metrics with {channels} channels")
        return [f"_{n}" for n in names]

    def _write(self, engine: Engine) -> None:
        details = {m: torch.as_tensor(engine.state.metric_details[m]).float().cpu().numpy() for m in self.metric_names}
        rows = len(self._names)
        header, table, summary = ["image"], [[n] for n in self._names], {}
        for metric, values in details.items():
            values = values.reshape(values.shape[0], -1)[:rows]
            suffixes = self._columns(values.shape[1])
            for c, suffix in enumerate(suffixes):
                header.append(metric + suffix)
                for r in range(rows):
                    table[r].append(f"{values[r, c]:.6f}")
                summary[metric + suffix] = summarise(values[:, c])
            if len(suffixes) > 1:
                summary[metric + "_mean"] = summarise(np.nanmean(values, axis=1))
        with atomic_output(self.csv_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(table)
        report = {"num_images": rows, "metrics": summary}
        write_text_atomic(self.json_path, json.dumps(report, indent=2))
