"""Training guards: fail loudly where ignite would silently do nothing, and stop within a wall-clock budget."""

from __future__ import annotations

import time

from ignite.engine import Engine, Events


class EmptyEpochGuard:
    """Raise when a training epoch ends without a single iteration.

    Ignite runs an epoch over an empty data loader without complaint (e.g. a training set smaller than one batch
    with ``drop_last``, or a distributed shard that is); the run would then "finish" and save an untrained model.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._check_length)
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)

    def _check_length(self, engine: Engine) -> None:
        """Before the first epoch: a loader that knows its length and has none is refused at once."""
        loader = engine.state.dataloader
        try:
            length = len(loader)
        except TypeError:
            return
        if length == 0:
            self._fail(engine, "before training")

    def _started(self, engine: Engine) -> None:
        self._start_iteration = engine.state.iteration

    def _completed(self, engine: Engine) -> None:
        if engine.state.iteration == getattr(self, "_start_iteration", engine.state.iteration - 1):
            self._fail(engine, f"epoch {engine.state.epoch} ran no training iteration")

    @staticmethod
    def _fail(engine: Engine, when: str) -> None:
        loader = engine.state.dataloader
        sampler = getattr(loader, "sampler", None)
        size = len(sampler) if sampler is not None and hasattr(sampler, "__len__") else "?"
        raise RuntimeError(
            f"{when}: the training data loader is empty ({size} items for this process, batch size "
            f"{getattr(loader, 'batch_size', None)}, drop_last {getattr(loader, 'drop_last', None)}); "
            "add data, lower --batch_size, or check the datalist"
        )


class TrainingTimeBudget:
    """Stop training at a validation epoch when the next validation period would end past a wall-clock budget.

    The comparison of methods on one machine gives each the same training time (``max_train_minutes``). The
    check runs at the end of every ``interval``-th epoch (the epochs that are validated, so the last model is
    always validated and the best one saved): with ``t`` minutes spent over ``p`` validation periods, training
    stops when ``t + t / p`` would pass the budget. Time spent before the first iteration (data loading, network
    construction) counts as well. A resumed run counts from its own start. The elapsed training time is stored
    in ``engine.state.metrics["train_minutes"]`` for the reports.

    Args:
        minutes: the budget; None or <= 0 disables the guard.
        interval: the validation interval in epochs.
    """

    def __init__(self, minutes: float | None, interval: int = 1) -> None:
        self.minutes = None if minutes is None or float(minutes) <= 0 else float(minutes)
        self.interval = max(1, int(interval))
        self.stopped_at: int | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check)

    def _started(self, engine: Engine) -> None:
        self._start, self._first_epoch = time.monotonic(), engine.state.epoch

    def _check(self, engine: Engine) -> None:
        elapsed = (time.monotonic() - self._start) / 60.0
        engine.state.metrics["train_minutes"] = elapsed
        epochs = engine.state.epoch - self._first_epoch
        if self.minutes is None or engine.state.epoch % self.interval or epochs <= 0:
            return
        periods = epochs / self.interval
        if elapsed + elapsed / periods > self.minutes and engine.state.epoch < engine.state.max_epochs:
            self.stopped_at = engine.state.epoch
            engine.logger.warning(
                f"time budget of {self.minutes:g} min: stopping after epoch {engine.state.epoch} of "
                f"{engine.state.max_epochs} ({elapsed:.1f} min spent; the next validation period would end past it)"
            )
            engine.terminate()
