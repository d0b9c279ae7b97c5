"""Training guards: fail loudly where ignite would silently do nothing."""

from __future__ import annotations

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
