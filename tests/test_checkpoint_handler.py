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


def _gan(seed: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {"generator": torch.nn.Linear(3, 2), "discriminator": torch.nn.Linear(2, 1)}


def _train(saver: AtomicCheckpointSaver, networks: dict, optimizers: dict, iterations: int) -> Engine:
    def step(engine, batch):
        for name, net in networks.items():
            optimizers[name].zero_grad()
            net(torch.ones(1, net.in_features)).sum().backward()
            optimizers[name].step()

    trainer = Engine(step)
    saver.attach(trainer)
    trainer.run([0] * iterations, max_epochs=1)
    return trainer


def test_init_weights_from_a_training_checkpoint_loads_networks_not_optimizers(tmp_path):
    from bundle.handlers.checkpoint import training_state

    first = _gan(0)
    first_opt = {k: torch.optim.Adam(v.parameters(), lr=0.1) for k, v in first.items()}
    ema = torch.nn.Linear(3, 2)
    saver = AtomicCheckpointSaver(tmp_path / "a", training_state(first, first_opt), first["generator"])
    saver.save_dict["ema_network"] = ema
    _train(saver, first, first_opt, iterations=3)
    trained = {k: {n: t.clone() for n, t in v.state_dict().items()} for k, v in first.items()}

    second = _gan(1)  # other initial weights
    second_opt = {k: torch.optim.Adam(v.parameters(), lr=0.1) for k, v in second.items()}
    second_ema = torch.nn.Linear(3, 2)
    loaded = {}
    fine_tune = AtomicCheckpointSaver(
        tmp_path / "b", training_state(second, second_opt), second["generator"],
        init_weights=tmp_path / "a" / "checkpoints" / "last.pt",
    )  # fmt: skip
    fine_tune.save_dict["ema_network"] = second_ema

    def step(engine, batch):  # what the first iteration sees
        loaded.update({k: {n: t.clone() for n, t in v.state_dict().items()} for k, v in second.items()})
        loaded["optimizer_steps"] = len(second_opt["generator"].state)

    trainer = Engine(step)
    fine_tune.attach(trainer)
    trainer.run([0], max_epochs=1)
    for name in ("generator", "discriminator"):
        for key, value in trained[name].items():
            torch.testing.assert_close(loaded[name][key], value)
    torch.testing.assert_close(second_ema.weight, ema.weight)
    assert loaded["optimizer_steps"] == 0  # fresh Adam state
    assert trainer.state.iteration == 1 and fine_tune.best_epoch == -1  # a new run's counters


def test_init_weights_from_a_model_file_loads_the_matching_network(tmp_path):
    from bundle.handlers.checkpoint import training_state

    served = torch.nn.Linear(3, 2)
    torch.save(served.state_dict(), tmp_path / "model.pt")
    networks = _gan(2)
    discriminator_before = networks["discriminator"].weight.clone()
    ema = torch.nn.Linear(3, 2)
    optimizers = {k: torch.optim.SGD(v.parameters(), lr=0.0) for k, v in networks.items()}
    saver = AtomicCheckpointSaver(tmp_path / "run", training_state(networks, optimizers), ema,
                                  init_weights=tmp_path / "model.pt")  # fmt: skip
    _train(saver, networks, optimizers, iterations=1)  # lr 0: the weights stay what was loaded
    torch.testing.assert_close(ema.weight, served.weight)
    torch.testing.assert_close(networks["generator"].weight, served.weight)
    torch.testing.assert_close(networks["discriminator"].weight, discriminator_before)  # no match: left fresh


@pytest.mark.parametrize("problem", ["missing", "not_a_checkpoint", "wrong_shapes"])
def test_init_weights_errors_name_the_file(tmp_path, problem):
    from bundle.handlers.checkpoint import training_state

    path = tmp_path / "weights.pt"
    if problem == "not_a_checkpoint":
        path.write_bytes(b"not a checkpoint")
    elif problem == "wrong_shapes":
        torch.save({"networks": {"generator": torch.nn.Linear(5, 2).state_dict(),
                                 "discriminator": torch.nn.Linear(2, 1).state_dict()}}, path)  # fmt: skip
    networks = _gan(3)
    optimizers = {k: torch.optim.SGD(v.parameters(), lr=0.1) for k, v in networks.items()}
    saver = AtomicCheckpointSaver(tmp_path / "run", training_state(networks, optimizers), networks["generator"],
                                  init_weights=path)  # fmt: skip
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        _train(saver, networks, optimizers, iterations=1)
    assert str(path) in str(err.value)
    assert {"missing": "names no file", "not_a_checkpoint": "not a readable", "wrong_shapes": "generator"}[
        problem
    ] in str(err.value)


def test_init_weights_without_an_average_starts_the_ema_at_the_loaded_weights(tmp_path):
    """A checkpoint of a run without EMA, fine-tuned with EMA: the average starts at the loaded network, not at the
    fresh initial weights (with decay 0.9999 it would stay near them for thousands of iterations)."""
    from bundle.handlers.checkpoint import training_state
    from bundle.handlers.ema import ExponentialMovingAverage

    trained = torch.nn.Linear(3, 2)
    torch.save({"networks": {"network": trained.state_dict()}}, tmp_path / "last.pt")
    torch.manual_seed(4)
    network, average = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema = ExponentialMovingAverage(network, average, decay=0.9999)
    optimizers = {"network": torch.optim.SGD(network.parameters(), lr=0.0)}
    state = training_state({"network": network}, optimizers, ema_network=average, ema=ema)
    saver = AtomicCheckpointSaver(tmp_path / "run", state, average, init_weights=tmp_path / "last.pt")
    assert not torch.equal(average.weight, trained.weight)
    _train(saver, {"network": network}, optimizers, iterations=1)
    torch.testing.assert_close(network.weight, trained.weight)
    torch.testing.assert_close(average.weight, trained.weight)
