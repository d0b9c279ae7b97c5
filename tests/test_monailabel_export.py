"""tools/export_monailabel_bundle.py: the self-contained bundle folder MONAI Label loads (no server here; the
server itself is tests/test_monailabel.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "export_monailabel_bundle", REPO / "tools" / "export_monailabel_bundle.py"
)
export_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_module)


def _weights(tmp_path: Path, configs: list[str], overrides: dict | None = None, wrap: str | None = None) -> Path:
    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / c) for c in configs])
    for k, v in (overrides or {}).items():
        parser[k] = v
    torch.manual_seed(0)
    state = parser.get_parsed_content("network_def").state_dict()
    path = tmp_path / "weights.pt"
    torch.save({wrap: state, "trainer": {"epoch": 3}} if wrap else state, path)
    return path


def test_2d_export_has_what_bundle_infer_and_train_tasks_read(tmp_path):
    out = export_module.export("synthetic", _weights(tmp_path, ["train.yaml"]), tmp_path / "monuseg_cdal")
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == ["*", "*"] and fmt["inputs"]["image"]["num_channels"] == 3
    assert fmt["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "nucleus"}
    infer = yaml.safe_load((out / "configs" / "inference.yaml").read_text())
    for key in ("network_def", "preprocessing", "inferer", "postprocessing", "device"):
        assert key in infer, key
    assert infer["inferer"]["_target_"].endswith("EnsembleInferer") and infer["write_predictions"] is False
    parser = ConfigParser()
    parser.read_config(str(out / "configs" / "inference.yaml"))
    names = [type(t).__name__ for t in parser.get_parsed_content("postprocessing").transforms]
    assert "Invertd" in names and "SaveMaskAndUncertaintyd" not in names  # MONAI Label writes its own outputs
    train = yaml.safe_load((out / "configs" / "train.yaml").read_text())
    assert train["train"]["handlers"] == []  # MONAI's list: BundleTrainTask appends its loader (dicts) there
    assert "@train::handlers" in train["train"]["trainer"]["train_handlers"]  # ids as MONAI normalises them
    assert train["run"] == "@training" and train["overwrite"] is True and train["val_interval"] == 1
    saved = torch.load(out / "models" / "model.pt", weights_only=True)
    assert set(saved) == set(torch.load(tmp_path / "weights.pt", weights_only=True))


def test_exported_inference_config_runs_on_a_tile(tmp_path):
    from PIL import Image

    out = export_module.export("synthetic", _weights(tmp_path, ["train.yaml"]), tmp_path / "b")
    parser = ConfigParser()
    parser.read_config(str(out / "configs" / "inference.yaml"))
    parser["bundle_root"], parser["num_generations"], parser["device"] = str(out), 2, "$'cpu'"
    tile = tmp_path / "tile.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(tile)
    net = parser.get_parsed_content("network")
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    data = parser.get_parsed_content("preprocessing")({"image": str(tile)})
    with torch.no_grad():
        result = parser.get_parsed_content("inferer")(data["image"][None], net.eval())
    data["pred"] = {k: v[0] for k, v in result.items()}
    data = parser.get_parsed_content("postprocessing")(data)
    assert tuple(data["pred"].shape) == (1, 96, 80) and tuple(data["uncertainty"].shape) == (1, 96, 80)
    assert set(torch.unique(data["pred"]).tolist()) <= {0.0, 1.0}


def test_hippocampus_export_is_3d_and_takes_the_trained_network_settings(tmp_path):
    configs = ["train.yaml", "methods/cdal.yaml", "datasets/hippocampus.yaml"]
    overrides = {"network_def#num_channels": 16, "network_def#attention_resolutions": []}
    weights = _weights(tmp_path, configs, overrides, wrap="generator")  # a training checkpoint (last.pt)
    with pytest.raises(ValueError, match="weights do not fit"):  # without the overrides it was trained with
        export_module.export("hippocampus", weights, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()
    out = export_module.export("hippocampus", weights, tmp_path / "hippo", overrides=overrides)
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == ["*", "*", "*"]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background",
        "1": "anterior",
        "2": "posterior",
    }
    infer = yaml.safe_load((out / "configs" / "inference.yaml").read_text())
    assert infer["network_def"]["num_channels"] == 16 and infer["label_channels"] == 3
    parsed = ConfigParser(infer)
    assert parsed.get_parsed_content("slice_axis") == 2 and parsed.get_parsed_content("roi_size") == [32, 32]


@pytest.mark.parametrize("method", ["unet", "segdiff"])
def test_every_method_exports_from_its_training_checkpoint(tmp_path, method):
    """A last.pt of the method-neutral layout: SegDiff serves its EMA network, the U-Net its one network."""
    configs = ["train.yaml", f"methods/{method}.yaml", "datasets/cxr.yaml"]
    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / c) for c in configs])
    torch.manual_seed(0)
    trained, ema = parser.get_parsed_content("network_def").state_dict(), None
    checkpoint = {"networks": {"network": trained}, "optimizers": {"network": {}}, "trainer": {"epoch": 1}}
    if method == "segdiff":
        ema = {k: v + 1 for k, v in trained.items()}
        checkpoint["ema_network"] = ema
    torch.save(checkpoint, tmp_path / "last.pt")
    out = export_module.export(
        "cxr", tmp_path / "last.pt", tmp_path / method, method_configs=[f"methods/{method}.yaml"]
    )
    saved = torch.load(out / "models" / "model.pt", weights_only=True)
    expected = ema if ema is not None else trained
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "lung"}


def test_export_refuses_to_replace_a_folder_or_read_a_bad_checkpoint(tmp_path):
    weights = _weights(tmp_path, ["train.yaml"])
    out = export_module.export("synthetic", weights, tmp_path / "b")
    marker = out / "configs" / "metadata.json"
    before = marker.read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_module.export("synthetic", weights, out)
    assert marker.read_text() == before
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        export_module.export("synthetic", bad, tmp_path / "c")
    with pytest.raises(ValueError, match="unknown dataset"):
        export_module.export("brats", weights, tmp_path / "d")
