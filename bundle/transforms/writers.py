"""Writing inference results next to each other: a mask and an uncertainty map per input image."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform
from PIL import Image

from bundle.engines.flags import as_bool


class SaveMaskAndUncertaintyd(MapTransform):
    """Save ``mask`` (C, H, W) in {0, 1} and ``uncertainty`` (C, H, W) as PNGs named after the input image.

    Files: ``<output_dir>/masks/<stem>.png`` (uint8, 1 = foreground, 0 = background; for several classes the
    class index) and ``<output_dir>/uncertainty/<stem>.png`` (uint8, 255 = a standard deviation of 0.5 between
    generations, the largest possible). An existing file is never replaced unless ``overwrite`` is true.
    """

    def __init__(
        self,
        output_dir: str,
        mask_key: str = "mask",
        uncertainty_key: str = "uncertainty",
        image_key: str = "image",
        overwrite: bool = False,
    ) -> None:
        super().__init__([mask_key], allow_missing_keys=False)
        self.output_dir = Path(output_dir)
        self.mask_key, self.uncertainty_key, self.image_key = mask_key, uncertainty_key, image_key
        self.overwrite = as_bool(overwrite, "overwrite")

    def _write(self, array: np.ndarray, path: Path) -> None:
        if path.exists() and not self.overwrite:
            raise FileExistsError(f"{path}: exists already; pass '--overwrite true' or another output_dir")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        meta = getattr(d[self.image_key], "meta", {})
        stem = Path(str(meta.get("filename_or_obj", "image"))).stem
        mask = torch.as_tensor(d[self.mask_key]).detach().cpu()
        labels = mask[0] if mask.shape[0] == 1 else mask.argmax(0)
        self._write(labels.numpy().astype(np.uint8), self.output_dir / "masks" / f"{stem}.png")
        if self.uncertainty_key in d:
            unc = torch.as_tensor(d[self.uncertainty_key]).detach().cpu().float().amax(0)
            scaled = (unc / 0.5).clamp(0, 1).mul(255).round().byte().numpy()
            self._write(scaled, self.output_dir / "uncertainty" / f"{stem}.png")
        return d
