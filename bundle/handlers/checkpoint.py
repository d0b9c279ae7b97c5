"""Atomic checkpoints: the last training state every epoch and the best model by a validation metric.

Files (``save_dir`` is the bundle's ``models/`` folder):
- ``model.pt``: the plain state dict of the network used for inference (the bundle's ``network``: the cDAL
  generator, the EMA of a network trained with EMA, ...), saved when the key validation metric improves; this is
  what ``evaluate.yaml``, ``inference.yaml`` and MONAI Label load.
- ``checkpoints/last.pt``: everything ``--resume`` needs, built by :func:`training_state` from the method's
  slots: ``networks``, ``optimizers`` and ``lr_schedulers`` (each a dict by name, e.g.
  ``last["optimizers"]["generator"]``), the EMA network and state when EMA is on, the method's extra objects
  (``checkpoint_extras``, e.g. MoSE's gamma schedule), the trainer's epoch and iteration, the best metric so far,
  and the random states (torch, NumPy, Python, the training transforms': :class:`RandomStates`), so that a seeded
  run resumed from an epoch boundary continues exactly as the uninterrupted run would have.
  Checkpoints of the bundle before the method-neutral layout (flat keys ``generator``, ``g_optimizer``, ...) are
  converted on resume by :func:`upgrade_legacy_state`.
Each file is written to a temporary name in the same folder and moved over the old one with ``os.replace``, so a
crash never leaves a half-written checkpoint. Under ``torch.distributed`` the handler exists on every rank (it
runs no collective operation), every rank restores from ``last.pt``, and only rank 0 writes; networks are saved
without their DDP wrapper. A new (non-resumed) run refuses to start over an existing checkpoint;
a resumed run restores every object of ``save_dict``, the trainer's epoch/iteration and the best metric from
``last.pt`` (loaded with ``weights_only=True``, restored with ignite's ``Checkpoint.load_objects``, keeping this
run's ``max_epochs``) before the first iteration.
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
from ignite.handlers import Checkpoint

from bundle.data.errors import OutputError, error_chain
from bundle.files import atomic_output
from bundle.runtime import as_bool, process_rank, unwrap_network

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` through a temporary file and ``os.replace`` (permissions follow the umask); a failed
    write (a full disk, a file-size limit, no permission) leaves ``path`` as it was and raises ``OutputError``."""
    path = Path(path)
    try:
        # a Python file object: a refused write is then an OSError with its errno (torch's own file writer reports
        # only "unexpected pos")
        with atomic_output(path, fsync=True, single_writer=True) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as err:
        written = any(isinstance(link, OSError) for link in error_chain(err)) or "writ" in str(err).lower()
        if not written:
            raise  # not a write failure (torch reports those as RuntimeError: "failed writing file ...")
        kept = "the previous file is kept" if path.exists() else "no file was written"
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise OutputError(path, f"could not be written ({reason}); {kept}") from err
    return path


class StateCollection:
    """Objects with ``state_dict``/``load_state_dict`` by name, saved and restored as one nested dict.

    Networks are saved without their DDP / compile wrappers. Loading requires the same names as the saved ones.
    """

    def __init__(self, objects: Mapping[str, Any] | None) -> None:
        self.objects = dict(objects or {})

    def state_dict(self) -> dict[str, Any]:
        return {k: _unwrapped(v).state_dict() for k, v in self.objects.items()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        if set(state) != set(self.objects):
            raise KeyError(f"the checkpoint holds {sorted(state)}, this run expects {sorted(self.objects)}")
        for name, obj in self.objects.items():
            target = _unwrapped(obj)
            if isinstance(target, torch.nn.Module):
                target.load_state_dict(state[name], strict=strict)
            else:
                target.load_state_dict(state[name])


class ScheduleCollection(StateCollection):
    """The learning-rate schedules of a run: restored as ``StateCollection``, except that a cosine schedule keeps
    this run's length (``T_max``). Resumed with another ``max_epochs`` (extending a finished run), it continues from
    where it stands towards the new end, rather than past the old one's end, where its learning rate rises again."""

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        horizons = {name: getattr(_unwrapped(obj), "T_max", None) for name, obj in self.objects.items()}
        super().load_state_dict(state, strict)
        for name, horizon in horizons.items():
            schedule = _unwrapped(self.objects[name])
            if horizon is not None and schedule.T_max != horizon:
                logger.warning(
                    f"{name}: the checkpoint's cosine schedule ends at epoch {schedule.T_max}, this run at {horizon}; "
                    f"continuing towards {horizon}"
                )
                schedule.T_max = horizon


def _randomizables(transforms: Any) -> list[Any]:
    """Every MONAI ``Randomizable`` in a transform (``Compose`` nested or not) and the ones it holds as attributes."""
    from monai.transforms import Compose, Randomizable

    found: list[Any] = []

    def visit(t: Any, depth: int = 0) -> None:
        if isinstance(t, Compose):
            for inner in t.transforms:
                visit(inner, depth)
            return
        if isinstance(t, (list, tuple)):
            for inner in t:
                visit(inner, depth)
            return
        if isinstance(t, Randomizable) and all(t is not f for f in found):
            found.append(t)
        if depth < 2 and hasattr(t, "__dict__"):
            for value in vars(t).values():
                if isinstance(value, (Randomizable, Compose)):
                    visit(value, depth + 1)

    visit(transforms)
    return found


def _numpy_state_to_torch(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}  # fmt: skip


def _numpy_state_from_torch(state: Mapping[str, Any]) -> tuple:
    import numpy as np

    keys = state["keys"].numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["cached"]


class RandomStates:
    """The random states a training run draws from, as one checkpoint entry (tensors and plain values only, so
    ``weights_only=True`` loads them): torch's CPU and CUDA generators, NumPy's and Python's global ones, and the
    ``R`` of every random MONAI transform in ``transforms`` (the training augmentations). Restored in a
    single-process run only: under torch.distributed each rank keeps its own seed."""

    def __init__(self, transforms: Any = None) -> None:
        self.transforms = _randomizables(transforms) if transforms is not None else []

    def state_dict(self) -> dict[str, Any]:
        import random

        import numpy as np

        version, internal, gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state_to_torch(np.random.get_state()),
            "python": {"version": version, "internal": list(internal), "gauss": gauss},
            "transforms": [_numpy_state_to_torch(t.R.get_state()) for t in self.transforms],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        import random

        import numpy as np
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # last.pt holds rank 0's streams; every rank taking them would give all ranks the same crops and noise
            logger.warning("resuming under torch.distributed: each rank keeps its own seed (seed + rank), so the "
                           "resumed run draws other random numbers than the uninterrupted one would")  # fmt: skip
            return
        if len(state["transforms"]) != len(self.transforms):
            raise ValueError(
                f"the checkpoint holds the random states of {len(state['transforms'])} transforms, this run has "
                f"{len(self.transforms)}: were the training transforms changed?"
            )
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda", [])
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(_numpy_state_from_torch(state["numpy"]))
        python = state["python"]
        random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
        for transform, saved in zip(self.transforms, state["transforms"]):
            transform.R.set_state(_numpy_state_from_torch(saved))


def training_state(
    networks: Mapping[str, Any],
    optimizers: Mapping[str, Any],
    lr_schedulers: Mapping[str, Any] | None = None,
    extras: Mapping[str, Any] | None = None,
    ema_network: torch.nn.Module | None = None,
    ema: Any = None,
    random_transforms: Any = None,
) -> dict[str, Any]:
    """The ``save_dict`` of ``AtomicCheckpointSaver`` from a method's slots (module docstring).

    ``ema_network``/``ema`` are saved only when EMA is on (``ema`` not None); ``random_transforms`` (the training
    augmentations) have their random states saved with the global ones (``random_states``).
    """
    state: dict[str, Any] = {
        "networks": StateCollection(networks),
        "optimizers": StateCollection(optimizers),
        "lr_schedulers": ScheduleCollection(lr_schedulers),
        "random_states": RandomStates(random_transforms),
    }
    if ema is not None:
        state["ema_network"] = ema_network
        state["ema"] = ema
    for name, obj in (extras or {}).items():
        if name in state:
            raise ValueError(f"checkpoint_extras may not use the reserved name {name!r}")
        state[name] = obj
    return state


# entries a checkpoint of an earlier version may lack; resuming it restores the rest
OPTIONAL_STATES = {"random_states"}

# flat keys of checkpoints written before the method-neutral layout -> (group, name) in the new one
LEGACY_KEYS = {
    "generator": ("networks", "generator"),
    "discriminator": ("networks", "discriminator"),
    "g_optimizer": ("optimizers", "generator"),
    "d_optimizer": ("optimizers", "discriminator"),
    "g_lr_scheduler": ("lr_schedulers", "generator"),
    "d_lr_scheduler": ("lr_schedulers", "discriminator"),
    "network": ("networks", "network"),
    "optimizer": ("optimizers", "network"),
    "lr_scheduler": ("lr_schedulers", "network"),
}


def upgrade_legacy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint of the earlier flat layout (cDAL ``generator``/``g_optimizer``/..., SegDiff ``network``/
    ``ema_network``/``optimizer``/``ema``, the baselines' ``network``/``optimizer``/``lr_scheduler``) in the
    nested layout of :func:`training_state`; a checkpoint already nested is returned unchanged.

    A SegDiff checkpoint saved an unused ``lr_scheduler`` of None; empty groups become empty dicts.
    """
    if "networks" in state:
        return dict(state)
    out: dict[str, Any] = {"networks": {}, "optimizers": {}, "lr_schedulers": {}}
    for key, value in state.items():
        if key in LEGACY_KEYS:
            group, name = LEGACY_KEYS[key]
            if value is not None:
                out[group][name] = value
        else:
            out[key] = value
    return out


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
        init_weights: fine-tune: a new (not resumed) run starts from these weights, with fresh optimizers, learning
            rate schedules and epoch count. Either a training checkpoint (``checkpoints/last.pt`` of a run of the
            same method and networks: every network and the EMA network are loaded) or a bundle's ``model.pt``
            (the served network: loaded into ``model`` and into the trained network of the same parameters, e.g.
            the cDAL generator; a discriminator starts fresh).
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
        init_weights: str | os.PathLike | None = None,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.init_weights = Path(init_weights) if init_weights else None
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
        """Restore or refuse at the start; ``last.pt`` at every epoch end; ``model.pt`` when a validation improves.

        The best model is saved when the validation evaluator completes (whichever order the trainer's handlers
        were attached in); ``last.pt`` is written again if that validation comes after this epoch's ``last.pt``.
        """
        self.trainer = engine
        self._last_saved_epoch = -1
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.COMPLETED, self._validated)

    def _objects(self) -> dict[str, Any]:
        objects = {k: _unwrapped(v) for k, v in self.save_dict.items()}
        return {**objects, "trainer": self.trainer, "checkpointer": self}

    def _start(self, engine: Engine) -> None:
        if self.resume:
            if not self.last_path.is_file():
                raise FileNotFoundError(f"{self.last_path}: --resume was requested but there is no checkpoint here")
            checkpoint = torch.load(self.last_path, map_location=self.map_location, weights_only=True)
            checkpoint = upgrade_legacy_state(checkpoint)
            objects = self._objects()
            for optional in OPTIONAL_STATES - set(checkpoint):  # written before they were saved
                logger.warning(f"{self.last_path}: holds no {optional}; the resumed run draws new random numbers")
                objects.pop(optional, None)
            missing = sorted(set(objects) - set(checkpoint))
            if missing:
                raise KeyError(
                    f"{self.last_path}: no {', '.join(missing)} in this checkpoint (it holds "
                    f"{sorted(checkpoint)}); was it written by another method?"
                )
            max_epochs = engine.state.max_epochs  # this run's target, which the checkpoint's must not replace
            try:
                Checkpoint.load_objects(to_load=objects, checkpoint=checkpoint)
            except (KeyError, RuntimeError, ValueError) as err:
                raise ValueError(f"{self.last_path}: does not fit this run's networks/optimizers: {err}") from err
            if max_epochs is not None and engine.state.epoch > max_epochs:
                raise ValueError(
                    f"{self.last_path}: the checkpoint is at epoch {engine.state.epoch}, beyond "
                    f"--max_epochs {max_epochs}; give a larger --max_epochs to continue"
                )
            engine.state.max_epochs = max_epochs
            logger.info(f"resumed from {self.last_path} at epoch {engine.state.epoch}")
            return
        existing = [p for p in (self.model_path, self.last_path) if p.exists()]
        if existing and not self.overwrite:
            raise FileExistsError(
                f"{existing[0]}: a checkpoint from an earlier run exists. Continue it with '--resume true', "
                "write elsewhere with '--bundle_root <folder>' (or '--ckpt_dir'), or replace it with '--overwrite true'."
            )
        if self.init_weights is not None:
            self._load_initial_weights(self.init_weights)

    def _load_initial_weights(self, path: Path) -> None:
        """Networks (not optimizers, schedules or counters) from a training checkpoint or a ``model.pt``."""
        if not path.is_file():
            raise FileNotFoundError(f"{path}: --init_weights names no file (a checkpoints/last.pt or a model.pt)")
        try:
            state = torch.load(path, map_location=self.map_location, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ValueError(f"{path}: --init_weights is not a readable PyTorch checkpoint ({err})") from err
        if not isinstance(state, Mapping):
            raise ValueError(f"{path}: --init_weights holds a {type(state).__name__}, not a state dict")
        networks = self.save_dict.get("networks")
        targets: list[tuple[str, torch.nn.Module, Mapping[str, Any]]] = []
        if "networks" in state or any(k in LEGACY_KEYS for k in state):
            state = upgrade_legacy_state(state)
            for name, obj in getattr(networks, "objects", {}).items():
                if name not in state["networks"]:
                    raise KeyError(f"{path}: holds the networks {sorted(state['networks'])}, this run trains {name!r}")
                targets.append((name, _unwrapped(obj), state["networks"][name]))
            if "ema_network" in state and "ema_network" in self.save_dict:
                targets.append(("ema_network", _unwrapped(self.save_dict["ema_network"]), state["ema_network"]))
        else:  # a model.pt: the served network's weights
            targets.append(("model", _unwrapped(self.model), state))
            for name, obj in getattr(networks, "objects", {}).items():
                module = _unwrapped(obj)
                own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
                if module is not _unwrapped(self.model) and own == {k: tuple(v.shape) for k, v in state.items()}:
                    targets.append((name, module, state))
        for name, module, weights in targets:
            try:
                module.load_state_dict(weights)
            except RuntimeError as err:
                raise ValueError(f"{path}: does not fit this run's {name}: {err}") from err
        ema = self.save_dict.get("ema")
        if ema is not None and not any(name in ("ema_network", "model") for name, _, _ in targets):
            ema.copy_weights()  # the file holds no average of its own: start it at the loaded weights
        logger.info(f"initial weights from {path}: {', '.join(sorted({n for n, _, _ in targets}))}")

    def _epoch_completed(self, engine: Engine) -> None:
        if self.evaluator is None and process_rank() == 0:
            atomic_torch_save(_unwrapped(self.model).state_dict(), self.model_path)
        self._save_last(int(engine.state.epoch))

    def _validated(self, evaluator: Engine) -> None:
        if self.trainer is None or self.key_metric_name not in evaluator.state.metrics:
            return
        epoch = int(self.trainer.state.epoch)
        value = float(evaluator.state.metrics[self.key_metric_name])
        if value > self.best_metric:
            self.best_metric, self.best_epoch = value, epoch
            if process_rank() == 0:
                atomic_torch_save(_unwrapped(self.model).state_dict(), self.model_path)
            logger.info(f"epoch {epoch}: new best {self.key_metric_name} = {value:.4f}, saved {self.model_path}")
            if self._last_saved_epoch == epoch:  # this epoch's last.pt was written before the validation
                self._save_last(epoch)

    def _save_last(self, epoch: int) -> None:
        self._last_saved_epoch = epoch
        if process_rank() == 0:
            atomic_torch_save({k: _state_of(v) for k, v in self._objects().items()}, self.last_path)
