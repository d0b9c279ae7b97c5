"""The worked example of docs/architecture.md ("Adding a dataset") is true: its overlay, taken from the page as it is,
trains, evaluates and serves through the unchanged workflows, with every method's tiny network."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from workflow_matrix import REPO, TINY_METHOD, TINY_RUN

from bundle.composer import compose, config_files

PAGE = REPO / "docs" / "architecture.md"


def _overlay() -> str:
    match = re.search(r"<!-- example: dataset overlay -->\s*```yaml\n(.*?)```", PAGE.read_text(), re.S)
    assert match, "docs/architecture.md has no 'dataset overlay' example block"
    return match.group(1)


def _write_pngs(root: Path, count: int = 6, size: int = 40) -> dict[str, list[str]]:
    """Grey images with a bright disc, its 0/255 mask, and the datalist JSON that lists them."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(count):
        yy, xx = np.mgrid[:size, :size]
        cy, cx, r = rng.integers(12, size - 12, 2).tolist() + [int(rng.integers(6, 10))]
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8) * 255
        image = np.clip(60 + 0.6 * mask + rng.normal(0, 12, mask.shape), 0, 255).astype(np.uint8)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"case{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i}.png")
        entries.append({"image": f"images/case{i}.png", "label": f"masks/case{i}.png"})
    datalist = {"training": entries[:4], "validation": entries[4:5], "test": entries[5:]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    return datalist


def test_the_documented_dataset_is_one_overlay_without_code():
    overlay = _overlay()
    assert "_target_: bundle." not in overlay and "$bundle." not in overlay  # MONAI parts and the bases' slots only
    assert len(overlay.strip().splitlines()) <= 35


@pytest.mark.parametrize("method", ["cdal", "unet"])
def test_the_documented_dataset_runs_every_workflow(tmp_path, method):
    overlay = tmp_path / "my_pngs.yaml"
    overlay.write_text(_overlay())
    data = tmp_path / "my_pngs"
    _write_pngs(data)
    root = tmp_path / "run"
    common = {**TINY_METHOD[method], "bundle_root": str(root), "dataset_dir": str(data), "image_size": 32}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for workflow, extra in (
            ("training", {**TINY_RUN, "batch_size": 2}),
            ("evaluating", {**TINY_RUN, "batch_size": 2}),
            ("inference", {"input_dir": str(data / "images"), "output_dir": str(root / "inference")}),
        ):
            files = [*config_files(workflow, method), overlay]
            overrides = {**common, **extra, "tracking_uri": f"sqlite:///{root / 'mlruns.db'}"}
            parser = compose(files, overrides)
            parser.get_parsed_content("run")
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((root / "eval" / "evaluation_my_pngs_test" / "metrics_summary.json").read_text())
    assert summary["num_images"] == 1
    masks = sorted((root / "inference" / "masks").glob("*.png"))
    assert len(masks) == 6 and Image.open(masks[0]).size == (40, 40)  # back at the input's own size
    assert len(list((root / "inference" / "uncertainty").glob("*.png"))) == 6
