"""PNG panels of image / ground truth / ensemble mean / uncertainty for a few validation images.

2-D images are shown whole; volumes (C, H, W, D) by their middle slice along the last (axial) axis. Several label
channels are shown as one: the largest probability (and uncertainty) over the channels, any foreground label.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image

from bundle.files import atomic_output


def _to_uint8(x: torch.Tensor, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """(C, H, W) tensor -> (H, W, 3) uint8, linearly scaled from [lo, hi] (default: the image's own range)."""
    a = torch.as_tensor(x).detach().float().cpu()
    if a.shape[0] not in (1, 3):
        a = a[:1]
    lo = float(a.min()) if lo is None else lo
    hi = float(a.max()) if hi is None else hi
    a = ((a - lo) / max(hi - lo, 1e-8)).clamp(0, 1) * 255
    a = a.round().byte().numpy().transpose(1, 2, 0)
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def as_panel_image(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) unchanged; (C, H, W, D) -> its middle slice (C, H, W)."""
    x = torch.as_tensor(x).detach()
    return x[..., x.shape[-1] // 2] if x.ndim == 4 else x


def compose_panel(rows: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """Grid (sum of H, 4 * largest W, 3) uint8: image (own range), label (>0 white), mean probability, uncertainty.

    The uncertainty column maps a standard deviation of 0.5 (the largest possible for probabilities) to white.
    """
    tiles = []
    for r in rows:
        r = {k: as_panel_image(v) for k, v in r.items()}
        label = (r["label"] > 0).float().amax(0, keepdim=True)
        cols = [_to_uint8(r["image"]), _to_uint8(label, 0, 1), _to_uint8(r["pred"].float().amax(0, keepdim=True), 0, 1)]
        unc = r.get("uncertainty")
        cols.append(_to_uint8(unc.float().amax(0, keepdim=True), 0, 0.5) if unc is not None else np.zeros_like(cols[0]))
        tiles.append(np.concatenate(cols, axis=1))
    width = max(t.shape[1] for t in tiles)  # images of different sizes: rows padded on the right
    return np.concatenate([np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles], axis=0)


class PredictionPanelWriter:
    """Evaluator handler: keep the first ``num_images`` outputs and write ``<prefix>_epoch_<e>.png`` each epoch.

    Args:
        output_dir: folder for the PNG files.
        num_images: images per panel.
        epoch_transform: maps the evaluator's epoch to the number in the file name (the trainer's epoch).
        prefix: file name prefix.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        num_images: int = 4,
        epoch_transform: Callable[[int], int] = lambda e: e,
        prefix: str = "validation",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.num_images = num_images
        self.epoch_transform = epoch_transform
        self.prefix = prefix
        self._rows: list[dict[str, torch.Tensor]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self._rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        for item in items:
            if len(self._rows) >= self.num_images:
                return
            self._rows.append({k: item[k] for k in ("image", "label", "pred", "uncertainty") if k in item})

    def _write(self, engine: Engine) -> None:
        if not self._rows:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        epoch = self.epoch_transform(int(engine.state.epoch))
        path = self.output_dir / f"{self.prefix}_epoch_{epoch:04d}.png"
        with atomic_output(path) as tmp:
            Image.fromarray(compose_panel(self._rows)).save(tmp)
