"""Tile/mask loaders, colour jitter and the cDAL MoNuSeg recipes."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from PIL import Image

from bundle.data.errors import DataFormatError
from bundle.data.monuseg import find_monuseg_pairs
from bundle.data.synthetic import write_synthetic_monuseg
from bundle.transforms.intensity import RandColorJitterd
from bundle.transforms.io import LoadInstanceMaskd, LoadTiled
from bundle.transforms.spatial import RandIsotropicAffined


@pytest.fixture(scope="module")
def synthetic_pair(tmp_path_factory) -> dict:
    root = write_synthetic_monuseg(tmp_path_factory.mktemp("tx") / "synth", num_train=1, num_test=0, size=256)
    return find_monuseg_pairs(root)[0]


def load(data: dict) -> dict:
    return LoadInstanceMaskd(keys="label", image_key="image")(LoadTiled(keys="image")(data))


# ---------------------------------------------------------------- loaders


def test_load_tiled_layout_and_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.tif", compression="tiff_lzw")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full((5, 7), 9, np.uint8)])).save(tmp_path / "rgba.png")
    out = LoadTiled(keys=["a", "b", "c"])(
        {"a": str(tmp_path / "rgb.tif"), "b": str(tmp_path / "grey.png"), "c": str(tmp_path / "rgba.png")}
    )
    for key in "abc":
        assert isinstance(out[key], MetaTensor) and out[key].dtype == torch.float32
        assert tuple(out[key].shape) == (3, 5, 7)  # (C, H, W), H = rows
    np.testing.assert_array_equal(out["a"].numpy(), rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(out["c"].numpy(), rgb.transpose(2, 0, 1))
    assert (out["b"][0] == out["b"][2]).all() and (out["b"][1].numpy() == rgb[..., 0]).all()
    assert out["a"].meta["filename_or_obj"] == str(tmp_path / "rgb.tif")


def test_corrupt_images_name_the_file(tmp_path, synthetic_pair):
    random_bytes = tmp_path / "random.tif"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(3000))
    tif = Path(synthetic_pair["image"]).read_bytes()
    truncated_tif = tmp_path / "truncated.tif"
    truncated_tif.write_bytes(tif[: len(tif) // 2])
    png = tmp_path / "full.png"
    Image.open(synthetic_pair["image"]).save(png)
    truncated_png = tmp_path / "truncated.png"
    truncated_png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])  # header intact, data cut
    for path in (random_bytes, truncated_tif, truncated_png, tmp_path / "missing.tif"):
        with pytest.raises(DataFormatError) as info:
            LoadTiled()({"image": str(path)})
        assert str(info.value).startswith(str(path)), str(info.value)
    # inside a Compose MONAI wraps it in a RuntimeError; the cause is still ours
    with pytest.raises(RuntimeError) as info:
        Compose([LoadTiled()])({"image": str(random_bytes)})
    assert isinstance(info.value.__cause__, DataFormatError)


def test_mask_loading_values_and_sizes(tmp_path):
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "img.png")
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 2:5] = 255
    mask[4, 6] = 1
    Image.fromarray(mask).save(tmp_path / "ok.png")
    out = load({"image": str(tmp_path / "img.png"), "label": str(tmp_path / "ok.png")})
    assert tuple(out["label"].shape) == (1, 6, 8) and out["label"].dtype == torch.float32
    np.testing.assert_array_equal(out["label"][0].numpy(), (mask > 0).astype(np.float32))
    assert out["label"].meta["filename_or_obj"] == str(tmp_path / "ok.png")
    # the image may also be given as a path, not yet loaded
    direct = LoadInstanceMaskd()({"image": str(tmp_path / "img.png"), "label": str(tmp_path / "ok.png")})
    assert torch.equal(direct["label"], out["label"])

    bad = mask.copy()
    bad[0, 0], bad[5, 7] = 7, 128
    Image.fromarray(bad).save(tmp_path / "bad_values.png")
    with pytest.raises(DataFormatError, match=r"found 7, 128") as info:
        load({"image": str(tmp_path / "img.png"), "label": str(tmp_path / "bad_values.png")})
    assert str(info.value).startswith(str(tmp_path / "bad_values.png"))

    Image.fromarray(np.zeros((5, 8), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(DataFormatError) as info:
        load({"image": str(tmp_path / "img.png"), "label": str(tmp_path / "small.png")})
    message = str(info.value)
    assert message.startswith(str(tmp_path / "small.png"))
    assert str(tmp_path / "img.png") in message and "5x8" in message and "6x8" in message


def test_xml_label_rasterised_at_image_size(tmp_path):
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "img.tif")
    (tmp_path / "a.xml").write_text(
        '<Annotations><Annotation><Regions><Region Id="1"><Vertices><Vertex X="2" Y="1"/><Vertex X="6" Y="1"/>'
        '<Vertex X="6" Y="4"/><Vertex X="2" Y="4"/></Vertices></Region></Regions></Annotation></Annotations>'
    )
    out = load({"image": str(tmp_path / "img.tif"), "label": str(tmp_path / "a.xml")})
    expected = np.zeros((10, 12), np.float32)
    expected[1:4, 2:6] = 1
    np.testing.assert_array_equal(out["label"][0].numpy(), expected)


# ---------------------------------------------------------------- colour jitter


def test_color_jitter_zero_strength_is_identity():
    image = MetaTensor(torch.rand(3, 16, 20) * 255, meta={"filename_or_obj": "x.tif"})
    out = RandColorJitterd(keys="image", brightness=0, contrast=0, saturation=0, hue=0)({"image": image})["image"]
    assert torch.equal(out.as_tensor(), image.as_tensor()) and out.meta["filename_or_obj"] == "x.tif"


def test_color_jitter_range_seeding_and_factors():
    image = torch.rand(3, 16, 20) * 255
    jitter = RandColorJitterd(keys="image", brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5)
    outs = []
    for seed in (0, 0, 1):
        jitter.set_random_state(seed)
        outs.append(jitter({"image": image})["image"])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    for _ in range(10):
        out = jitter({"image": image})["image"]
        assert out.min() >= 0 and out.max() <= 255 and out.shape == image.shape
    doubled = RandColorJitterd("image", brightness=(2, 2), contrast=0, saturation=0, hue=0)({"image": image})["image"]
    assert torch.allclose(doubled, (image * 2).clamp(0, 255))
    grey = RandColorJitterd("image", brightness=0, contrast=0, saturation=(0, 0), hue=0)({"image": image})["image"]
    assert torch.allclose(grey[0], grey[1]) and torch.allclose(grey[1], grey[2])
    shifted = RandColorJitterd("image", brightness=0, contrast=0, saturation=0, hue=(0.25, 0.25))({"image": image})
    r, g, b = (image[:, 3, 4] / 255).tolist()
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    expected = torch.tensor(colorsys.hsv_to_rgb((h + 0.25) % 1, s, v)) * 255
    assert torch.allclose(shifted["image"][:, 3, 4], expected, atol=1e-3)
    assert torch.equal(RandColorJitterd("image", prob=0.0)({"image": image})["image"], image)


# ---------------------------------------------------------------- recipes


def test_isotropic_affine_draws_one_zoom():
    affine = RandIsotropicAffined(
        keys=["image", "label"], rotate_degrees=22, zoom_range=(0.75, 1.25), mode=("bilinear", "nearest")
    )
    affine.set_random_state(0)
    label = (torch.rand(1, 32, 32) > 0.5).float()
    for _ in range(5):
        out = affine({"image": torch.rand(3, 32, 32), "label": label})
        scale = affine.rand_affine.rand_affine_grid.scale_params
        assert len(scale) == 2 and scale[0] == scale[1] and 1 / 1.25 <= scale[0] <= 1 / 0.75
        assert set(out["label"].unique().tolist()) <= {0.0, 1.0}


def _monuseg_pipeline(image_size: int, patch_size: int) -> tuple[Compose, Compose]:
    """The MoNuSeg pipeline as the configs write it (datasets/monuseg.yaml, the bases' default data): the cached
    loading + training augmentation, and loading + evaluation."""
    from bundle.composer import compose, config_files

    parser = compose(config_files("training", dataset="monuseg"), {"image_size": image_size, "patch_size": patch_size})
    parser.parse()
    load_tx = parser.get_parsed_content("load_transforms")
    train = Compose(load_tx + parser.get_parsed_content("train_transforms"))
    evaluate = Compose(load_tx + parser.get_parsed_content("eval_transforms"))
    return train, evaluate


def test_train_recipe_outputs(synthetic_pair):
    transforms, _ = _monuseg_pipeline(128, 64)
    transforms.set_random_state(0)
    first = transforms(dict(synthetic_pair))
    image, label = first["image"], first["label"]
    assert tuple(image.shape) == (3, 64, 64) and image.dtype == torch.float32
    assert tuple(label.shape) == (1, 64, 64) and label.dtype == torch.float32
    assert set(label.unique().tolist()) == {-1.0, 1.0}
    assert image.mean(dim=(1, 2)).abs().max() < 1.0 and 0.2 < image.std() < 2.0
    transforms.set_random_state(0)
    assert torch.equal(transforms(dict(synthetic_pair))["image"], image)


def test_default_recipes_on_a_tile(synthetic_pair):
    train, _ = _monuseg_pipeline(512, 256)  # the papers' sizes: resize 512, crop 256
    train = train(dict(synthetic_pair))
    assert tuple(train["image"].shape) == (3, 256, 256) and set(train["label"].unique().tolist()) == {-1.0, 1.0}
    _, evaluate = _monuseg_pipeline(128, 64)
    evaluated = evaluate(dict(synthetic_pair))
    assert tuple(evaluated["image"].shape) == (3, 128, 128) and tuple(evaluated["label"].shape) == (1, 128, 128)
    assert set(evaluated["label"].unique().tolist()) == {-1.0, 1.0}
    raw = load(dict(synthetic_pair))
    resized_fraction = (evaluated["label"] > 0).float().mean()
    assert abs(resized_fraction - raw["label"].mean()) < 0.02  # nearest resize keeps the foreground share
