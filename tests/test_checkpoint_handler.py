"""AtomicCheckpointSaver does not depend on the order the trainer's handlers were attached in."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from bundle.handlers.checkpoint import AtomicCheckpointSaver

SCORES = {1: 0.3, 2: 0.5, 3: 0.4}  # validation Dice per epoch: epoch 2 is the best


def _evaluator() -> Engine:
    def step(engine, batch):
        return None

    evaluator = Engine(step)

    @evaluator.on(Events.COMPLETED)
    def _score(engine):
        engine.state.metrics["val_dice"] = SCORES[engine.state.epoch]

    return evaluator


class Validate:
    """What MONAI's ValidationHandler does at every epoch end: run the evaluator as epoch ``trainer epoch``."""

    def __init__(self, evaluator: Engine) -> None:
        self.evaluator = evaluator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._run)

    def _run(self, engine: Engine) -> None:
        self.evaluator.state.max_epochs = engine.state.epoch
        self.evaluator.state.epoch = engine.state.epoch - 1
        self.evaluator.state.iteration = 0
        self.evaluator.run([0])


@pytest.mark.parametrize("saver_first", [True, False])
def test_best_model_and_last_checkpoint_whatever_the_handler_order(tmp_path, saver_first):
    network = torch.nn.Linear(2, 1)
    evaluator = _evaluator()
    saver = AtomicCheckpointSaver(tmp_path, {"network": network}, network, evaluator=evaluator)
    validation = Validate(evaluator)

    def step(engine, batch):
        with torch.no_grad():
            network.weight.add_(1.0)  # the weights change every iteration: they tell which epoch was saved

    trainer = Engine(step)
    for handler in [saver, validation] if saver_first else [validation, saver]:
        handler.attach(trainer)
    best = {}
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED,
        lambda e: best.setdefault(
            e.state.epoch, torch.load(tmp_path / "model.pt", weights_only=True)["weight"].clone()
        ),
    )
    trainer.run([0], max_epochs=3)
    model = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.testing.assert_close(model["weight"], best[2])  # epoch 2's weights, the best validation
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["checkpointer"] == {"best_metric": 0.5, "best_epoch": 2} and last["trainer"]["iteration"] == 3
