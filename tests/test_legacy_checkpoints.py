"""Checkpoints written before the method-neutral layout still load: model.pt as it is, last.pt converted on resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from bundle.composer import compose
from bundle.handlers.checkpoint import upgrade_legacy_state

HERE = Path(__file__).resolve().parent
LEGACY = HERE / "data" / "legacy_cdal"
CONFIGS = HERE.parent / "configs"
# the settings the legacy pair was trained with (tests/data/legacy_cdal/README.md)
SETTINGS = {
    "max_epochs": 1,
    "epoch_length": 2,
    "val_interval": 1,
    "num_generations": 1,
    "batch_size": 2,
    "image_size": 32,
    "patch_size": 32,
    "network_def#num_channels": 8,
    "network_def#channel_mult": [1, 1],
    "network_def#nz": 4,
    "network_def#z_emb_dim": 8,
    "network_def#attention_resolutions": [],
    "network_def#cond_enc_layers": 1,
    "discriminator_def#ngf": 2,
    "discriminator_def#channel_mult": [1, 1, 1],
}


def _parser(root: Path, **overrides) -> ConfigParser:
    data = "$bundle.data.synthetic.ensure_synthetic_monuseg(@dataset_dir, num_train=6, num_test=2, size=64, seed=0)"
    values = {
        **SETTINGS,
        "bundle_root": str(root),
        "dataset_dir": str(root / "data"),
        "dataset_root": data,
        **overrides,
    }
    parser = compose([CONFIGS / "train.yaml"], values)  # the default cDAL, its network settings nested
    for name in (
        "train#handlers_by_name#mlflow",
        "train#handlers_by_name#progress",
        "validate#handlers_by_name#mlflow",
    ):
        parser[f"{name}#_disabled_"] = True
    return parser


def test_legacy_model_loads_into_todays_network(tmp_path):
    network = _parser(tmp_path).get_parsed_content("network")
    network.load_state_dict(torch.load(LEGACY / "model.pt", weights_only=True), strict=True)


def test_legacy_layout_is_converted():
    legacy = torch.load(LEGACY / "last.pt", weights_only=True)
    assert "g_optimizer" in legacy and "networks" not in legacy
    state = upgrade_legacy_state(legacy)
    assert (
        set(state["networks"])
        == set(state["optimizers"])
        == set(state["lr_schedulers"])
        == {"generator", "discriminator"}
    )
    assert state["networks"]["generator"] is legacy["generator"]
    assert state["optimizers"]["discriminator"] is legacy["d_optimizer"]
    assert state["trainer"] == legacy["trainer"] and upgrade_legacy_state(state) == state
    # SegDiff's and the baselines' flat layouts map the same way
    segdiff = upgrade_legacy_state({"network": 1, "ema_network": 2, "optimizer": 3, "ema": 4, "lr_scheduler": None})
    assert segdiff == {
        "networks": {"network": 1},
        "optimizers": {"network": 3},
        "lr_schedulers": {},
        "ema_network": 2,
        "ema": 4,
    }


def test_resume_from_a_legacy_checkpoint_continues_it(tmp_path):
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    shutil.copy(LEGACY / "model.pt", tmp_path / "models" / "model.pt")
    shutil.copy(LEGACY / "last.pt", tmp_path / "models" / "checkpoints" / "last.pt")
    legacy = torch.load(LEGACY / "last.pt", weights_only=True)
    parser = _parser(tmp_path, resume=True, max_epochs=2)
    parser.get_parsed_content("training")
    after = torch.load(tmp_path / "models" / "checkpoints" / "last.pt", weights_only=True)
    assert legacy["trainer"]["iteration"] == 2 and after["trainer"]["iteration"] == 4
    steps = [float(s["step"]) for s in after["optimizers"]["generator"]["state"].values()]
    assert steps and all(s == 4 for s in steps)  # Adam's step count continued from the legacy optimiser state
    assert after["lr_schedulers"]["generator"]["last_epoch"] == 2
    assert after["checkpointer"]["best_metric"] >= legacy["checkpointer"]["best_metric"]
    with pytest.raises(Exception) as raised:
        _parser(tmp_path, resume=True, max_epochs=1).get_parsed_content("training")
    chain, error = [], raised.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__
    assert any("epoch 2, beyond --max_epochs 1" in message for message in chain)
