"""Command-line switches: `--amp false` reaches the config as the string "false" (fire parses only True/False)."""

import pytest
import torch

from bundle.handlers.checkpoint import AtomicCheckpointSaver
from bundle.inferers.autocast import autocast_dtype
from bundle.runtime import as_bool, prepare_network


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (None, False),
        (1, True),
        (0, False),
        ("true", True),
        ("True", True),
        ("yes", True),
        ("1", True),
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("off", False),
        ("none", False),
    ],
)
def test_switch_values(value, expected):
    assert as_bool(value) is expected


def test_unknown_switch_value_is_refused_with_its_name():
    with pytest.raises(ValueError, match="amp must be true or false, got 'maybe'"):
        as_bool("maybe", "amp")


def test_string_false_switches_things_off():
    net = prepare_network(torch.nn.Conv2d(1, 1, 1), "cpu", channels_last="false", distributed="false", compile="false")
    assert isinstance(net, torch.nn.Conv2d)
    assert autocast_dtype("false") is None and autocast_dtype("true") == torch.bfloat16
    saver = AtomicCheckpointSaver(
        save_dir="unused", model=torch.nn.Linear(1, 1), save_dict={}, resume="false", overwrite="false"
    )
    assert saver.resume is False and saver.overwrite is False


def test_empty_training_loader_is_an_error_not_a_silent_run():
    from ignite.engine import Engine

    from bundle.handlers.guards import EmptyEpochGuard

    loader = torch.utils.data.DataLoader(list(range(3)), batch_size=4, drop_last=True)
    engine = Engine(lambda e, b: None)
    EmptyEpochGuard().attach(engine)
    with pytest.raises(RuntimeError, match="data loader is empty .*batch size 4, drop_last True"):
        engine.run(loader, max_epochs=1, epoch_length=5)  # the trainers set epoch_length: ignite then runs nothing
    ran = []
    engine = Engine(lambda e, b: ran.append(b))
    EmptyEpochGuard().attach(engine)
    engine.run(torch.utils.data.DataLoader(list(range(3)), batch_size=2), max_epochs=2, epoch_length=3)
    assert len(ran) == 6
