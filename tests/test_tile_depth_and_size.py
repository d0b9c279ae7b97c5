"""Microscopy tiles as cameras write them (16-bit and float grey TIFF) are accepted on the 8-bit scale the
intensity normalisation expects; chest radiographs take 8- and 16-bit and refuse float with the reason; sizes far from the model's get a
warning with the resize factor (bundle/transforms/io.py, bundle/data/checks.py)."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bundle.data.checks import warn_if_resized
from bundle.data.errors import DataFormatError
from bundle.transforms.io import LoadTiled, read_rgb_tile

REPO = Path(__file__).resolve().parents[1]


def _grey_tile(shape=(64, 80), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (40 + 150 * ((yy - 30) ** 2 + (xx - 40) ** 2 < 300) + rng.normal(0, 10, shape)).clip(0, 255)


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_16_bit_and_float_tiles_come_out_with_8_bit_contrast(tmp_path, mode):
    grey8 = _grey_tile().astype(np.uint8)
    path = tmp_path / f"tile_{mode.replace(';', '')}.tif"
    if mode == "I;16":  # a 12-bit camera in a 16-bit container: values up to 4095
        Image.fromarray((grey8.astype(np.uint16) * 16)).save(path)
    else:
        Image.fromarray(grey8.astype(np.float32) / 255.0).save(path)
    assert Image.open(path).mode == mode
    rgb = read_rgb_tile(path)
    assert rgb.shape == (*grey8.shape, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    assert rgb.max() == 255 and rgb.min() == 0  # stretched between the 0.5th and 99.5th percentiles
    assert np.corrcoef(rgb[..., 0].ravel(), grey8.ravel())[0, 1] > 0.99


def test_a_float_tile_with_nan_and_a_float_radiograph_are_refused_with_the_reason(tmp_path):
    values = _grey_tile().astype(np.float32)
    values[3, 4] = np.nan
    Image.fromarray(values).save(tmp_path / "nan.tif")
    with pytest.raises(DataFormatError, match=r"nan\.tif: holds 1 non-finite"):
        read_rgb_tile(tmp_path / "nan.tif")
    from bundle.transforms.chest_xray import read_grey_radiograph

    Image.fromarray(_grey_tile().astype(np.float32)).save(tmp_path / "cxr_float.tif")  # radiographs: 8/16-bit only
    with pytest.raises(DataFormatError, match=r"cxr_float\.tif: unsupported image mode 'F'"):
        read_grey_radiograph(tmp_path / "cxr_float.tif")


def test_sizes_far_from_the_model_warn_with_the_factor(tmp_path, caplog):
    from monai.transforms import Compose, Resized

    resize = Compose([LoadTiled(keys="image"), Resized(keys="image", spatial_size=(64, 64), mode="area")])
    for name, shape in (("large.png", (600, 520)), ("tiny.png", (2, 3)), ("fine.png", (100, 90))):
        Image.fromarray(np.zeros((*shape, 3), np.uint8)).save(tmp_path / name)
    with caplog.at_level(logging.WARNING, logger="bundle.data.checks"):
        factors = {
            n: warn_if_resized(n, resize({"image": str(tmp_path / n)})["image"])
            for n in ("large.png", "tiny.png", "fine.png")
        }
    assert factors["large.png"] == pytest.approx(600 / 64)
    assert factors["tiny.png"] == pytest.approx(2 / 64)
    assert 1 / 4 < factors["fine.png"] < 4
    text = caplog.text
    assert "large.png: 600 x 520 pixels, shrunk 9.4x to the model's 64 x 64" in text
    assert "tiny.png: 2 x 3 pixels, enlarged 32.0x" in text
    assert "fine.png" not in text


def test_inference_serves_a_16_bit_tile_and_warns_about_a_huge_one(tmp_path):
    import torch
    from monai.bundle import ConfigParser

    bundle_root = tmp_path / "bundle"
    (bundle_root / "models").mkdir(parents=True)
    parser = ConfigParser()
    parser.read_config(str(REPO / "configs" / "inference.yaml"))
    torch.manual_seed(0)  # an untrained network: this checks what the pipeline accepts and writes, not the masks
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle_root / "models" / "model.pt")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray((_grey_tile((96, 96)).astype(np.uint16) * 257)).save(inputs / "camera16.tif")
    Image.fromarray(np.full((1200, 1000, 3), 200, np.uint8)).save(inputs / "slide.png")
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "['configs/inference.yaml']",
         "--input_dir", str(inputs), "--output_dir", str(tmp_path / "out"), "--num_generations", "1",
         "--bundle_root", str(bundle_root)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "slide.png: 1200 x 1000 pixels, shrunk" in run.stderr + run.stdout
    masks = {p.stem.split(".")[0]: np.asarray(Image.open(p)) for p in (tmp_path / "out" / "masks").iterdir()}
    assert set(masks) == {"camera16", "slide"}
    assert masks["camera16"].shape == (96, 96) and masks["slide"].shape == (1200, 1000)
