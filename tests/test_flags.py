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


def test_time_budget_stops_at_a_validation_epoch_within_the_budget():
    import time

    from ignite.engine import Engine

    from bundle.handlers.guards import TrainingTimeBudget

    def run(minutes, interval, max_epochs=200):
        engine = Engine(lambda e, b: time.sleep(0.02))
        guard = TrainingTimeBudget(minutes, interval=interval)
        guard.attach(engine)
        start = time.monotonic()
        engine.run(range(5), max_epochs=max_epochs)  # 0.1 s per epoch: 20 s unguarded
        return engine, guard, time.monotonic() - start

    engine, guard, seconds = run(0.02, 2)  # a 1.2 s budget
    assert guard.stopped_at is not None and guard.stopped_at % 2 == 0 and engine.state.epoch == guard.stopped_at
    assert seconds < 1.2 + 0.1 and engine.state.metrics["train_minutes"] * 60 == pytest.approx(seconds, abs=0.1)
    assert guard.stopped_at >= 6  # it used most of the budget
    engine, guard, _ = run(None, 1, max_epochs=8)  # no budget: runs to max_epochs
    assert guard.stopped_at is None and engine.state.epoch == 8
