"""Atomic checkpoints: the last training state every epoch and the best model by a validation metric.

Files (``save_dir`` is the bundle's ``models/`` folder):
- ``model.pt``: the state dict of the network used for inference (the cDAL generator), saved when the key
  validation metric improves; this is what ``evaluate.yaml``, ``inference.yaml`` and MONAI Label load.
- ``checkpoints/last.pt``: everything ``--resume`` needs (networks, optimizers, LR schedulers, the trainer's
  epoch and iteration, the best metric so far).
Each file is written to a temporary name in the same folder and moved over the old one with ``os.replace``, so a
crash never leaves a half-written checkpoint. Under ``torch.distributed`` the handler exists on every rank (it
runs no collective operation), every rank restores from ``last.pt``, and only rank 0 writes; networks are saved
without their DDP wrapper. A new (non-resumed) run refuses to start over an existing checkpoint;
a resumed run restores every object of ``save_dict``, the trainer's epoch/iteration and the best metric from
``last.pt`` (loaded with ``weights_only=True`` by MONAI's ``CheckpointLoader``) before the first iteration.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from bundle.diffusion.samplers import unwrap_network
from bundle.engines.seeding import process_rank
from bundle.engines.flags import as_bool

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` through a temporary file and ``os.replace`` (permissions follow the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _state_of(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def _unwrapped(obj: Any) -> Any:
    """Networks without their DDP / compile wrappers, so checkpoints hold plain state dicts."""
    return unwrap_network(obj) if isinstance(obj, torch.nn.Module) else obj


class AtomicCheckpointSaver:
    """Attach to the trainer, after the ``ValidationHandler``; the trainer itself is saved and restored too.

    Args:
        save_dir: output folder (``models/``).
        save_dict: objects with ``state_dict()`` saved in ``last.pt`` (networks, optimizers, LR schedulers).
        model: the network saved alone as ``model_filename`` when the validation metric improves.
        evaluator: the validation evaluator whose ``state.metrics[key_metric_name]`` selects the best model;
            None saves ``model_filename`` every epoch.
        key_metric_name: validation metric that selects the best model (higher is better).
        model_filename: file name of the best model in ``save_dir``.
        last_filename: path of the resumable checkpoint, relative to ``save_dir``.
        resume: whether this run continues from ``last_filename`` (then existing files are expected).
        overwrite: allow a new run to replace existing checkpoints in ``save_dir``.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        model: torch.nn.Module,
        evaluator: Engine | None = None,
        key_metric_name: str = "val_dice",
        model_filename: str = "model.pt",
        last_filename: str = "checkpoints/last.pt",
        resume: bool = False,
        overwrite: bool = False,
        map_location: str | torch.device | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.model = model
        self.evaluator = evaluator
        self.key_metric_name = key_metric_name
        self.model_path = self.save_dir / model_filename
        self.last_path = self.save_dir / last_filename
        self.resume = as_bool(resume, "resume")
        self.overwrite = as_bool(overwrite, "overwrite")
        self.map_location = map_location
        self.best_metric = -math.inf
        self.best_epoch = -1
        self.trainer: Engine | None = None

    def state_dict(self) -> dict[str, float | int]:
        return {"best_metric": float(self.best_metric), "best_epoch": int(self.best_epoch)}

    def load_state_dict(self, state: Mapping[str, float | int]) -> None:
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])

    def attach(self, engine: Engine) -> None:
        self.trainer = engine
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _objects(self) -> dict[str, Any]:
        objects = {k: _unwrapped(v) for k, v in self.save_dict.items()}
        return {**objects, "trainer": self.trainer, "checkpointer": self}

    def _start(self, engine: Engine) -> None:
        if self.resume:
            if not self.last_path.is_file():
                raise FileNotFoundError(f"{self.last_path}: --resume was requested but there is no checkpoint here")
            loader = CheckpointLoader(str(self.last_path), self._objects(), map_location=self.map_location)
            loader(engine)
            logger.info(f"resumed from {self.last_path} at epoch {engine.state.epoch}")
            return
        existing = [p for p in (self.model_path, self.last_path) if p.exists()]
        if existing and not self.overwrite:
            raise FileExistsError(
                f"{existing[0]}: a checkpoint from an earlier run exists. Continue it with '--resume true', "
                "write elsewhere with '--bundle_root <folder>' (or '--ckpt_dir'), or replace it with '--overwrite true'."
            )

    def _epoch_completed(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        writer = process_rank() == 0
        model_state = _unwrapped(self.model).state_dict
        if self.evaluator is None:
            if writer:
                atomic_torch_save(model_state(), self.model_path)
        elif self.evaluator.state.epoch == epoch and self.key_metric_name in self.evaluator.state.metrics:
            value = float(self.evaluator.state.metrics[self.key_metric_name])
            if value > self.best_metric:
                self.best_metric, self.best_epoch = value, epoch
                if writer:
                    atomic_torch_save(model_state(), self.model_path)
                logger.info(f"epoch {epoch}: new best {self.key_metric_name} = {value:.4f}, saved {self.model_path}")
        if writer:
            atomic_torch_save({k: _state_of(v) for k, v in self._objects().items()}, self.last_path)
