"""Evaluator handlers that write predictions to disk: per-volume NIfTI label maps in the input's grid."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from bundle.runtime import as_bool
from bundle.transforms.writers import onehot_to_label_map, save_label_volume

__all__ = ["NiftiPredictionWriter"]


class NiftiPredictionWriter:
    """Evaluator handler: write every volume's predicted labels to ``<output_dir>/<input file name>``.

    Reads, per output item, ``pred_key`` (one-hot class channels, as from ``VoteArgmaxd``; channel c is label
    ``first_class + c``) and ``image_key`` (the input ``MetaTensor``: ``filename_or_obj`` and the processing
    ``affine``). A file that exists before this handler first writes it is only replaced with ``overwrite``;
    files it wrote itself are refreshed at every run of the evaluator (e.g. every validation).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pred_key: str = "pred",
        image_key: str = "image",
        first_class: int = 1,
        overwrite: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.pred_key, self.image_key = pred_key, image_key
        self.first_class = first_class
        self.overwrite = as_bool(overwrite, "overwrite")
        self._written: set[Path] = set()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write)

    def _write(self, engine: Engine) -> None:
        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            image = item[self.image_key]
            meta = getattr(image, "meta", None)
            if not meta or "filename_or_obj" not in meta or "affine" not in meta:
                raise ValueError("NiftiPredictionWriter needs the input image's metadata (filename_or_obj, affine)")
            source = os.fspath(meta["filename_or_obj"])
            target = self.output_dir / Path(source).name
            label_map = onehot_to_label_map(item[self.pred_key], self.first_class)
            allowed = self.overwrite or target in self._written
            save_label_volume(label_map, torch.as_tensor(meta["affine"]).cpu().numpy(), source, target, allowed)
            self._written.add(target)
