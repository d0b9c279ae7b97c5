"""A non-finite loss in any method stops training with the iteration named and the last good checkpoint kept.

Real runs on the tiny synthetic data (tests/workflow_matrix.py): one good epoch is trained and checkpointed; the run
is resumed with the training augmentation's normalisation dividing by 1e-38 (a real fault, as a wrong intensity
statistic in the augmentation pipeline would be), so the next iteration's inputs overflow to inf and its loss is
non-finite. (The same constant in the cached validation transforms no longer gets that far: the input checks refuse
the non-finite images before the first iteration, tests/test_input_checks.py.)
"""

import logging

import pytest
import torch
from workflow_matrix import METHODS, run_cell, write_tiny_data

from bundle.data.errors import LAST_LINE_ERRORS, find_input_error, one_line

NORMALISE = 5  # train.yaml's train_transforms: crop, two flips, affine, colour jitter, then the normalisation
OVERFLOWING_NORMALISATION = {
    "_target_": "NormalizeIntensityd",
    "keys": "image",
    "subtrahend": "@intensity_mean",
    "divisor": [1e-38, 1e-38, 1e-38],
    "channel_wise": True,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("divergence"))["synthetic"]


@pytest.mark.parametrize("method", METHODS)
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(method, data, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    try:
        run_cell("training", method, "synthetic", tmp_path, data)
        last = tmp_path / "models" / "checkpoints" / "last.pt"
        good = torch.load(last, weights_only=True)
        assert good["trainer"]["iteration"] == 2
        with pytest.raises(RuntimeError) as caught:  # MONAI's config evaluation wraps the trainer's error
            run_cell(
                "training", method, "synthetic", tmp_path, data,
                extra={"resume": True, "max_epochs": 2, f"train_transforms#{NORMALISE}": OVERFLOWING_NORMALISATION},
            )  # fmt: skip
    finally:
        logging.disable(logging.NOTSET)
        torch.set_num_threads(threads)
    stop = find_input_error(caught.value, LAST_LINE_ERRORS)
    assert isinstance(stop, FloatingPointError)  # the line the excepthook prints last
    assert "at iteration 3: training diverged and stopped" in one_line(stop)
    kept = torch.load(last, weights_only=True)
    assert kept["trainer"]["iteration"] == 2  # the checkpoint of the good epoch, untouched
    for name, state in good["networks"].items():
        for key, value in state.items():
            assert torch.equal(kept["networks"][name][key], value), f"{name}.{key} changed"
            if value.is_floating_point():
                assert torch.isfinite(value).all()
