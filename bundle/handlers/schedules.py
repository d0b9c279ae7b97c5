"""Learning-rate schedules of a method's optimizers, stepped by MONAI's ``LrScheduleHandler``."""

from __future__ import annotations

from collections.abc import Mapping

from ignite.engine import Engine
from monai.handlers import LrScheduleHandler
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["LrSchedulesHandler"]


class LrSchedulesHandler:
    """Attach one MONAI ``LrScheduleHandler`` per scheduler of a dict (a method's ``lr_schedulers`` slot).

    Args:
        lr_schedulers: schedulers by name (empty: nothing to step).
        epoch_level: step at every epoch end (True) or every iteration end.
    """

    def __init__(self, lr_schedulers: Mapping[str, LRScheduler] | None, epoch_level: bool = True) -> None:
        self.handlers = [
            LrScheduleHandler(lr_scheduler=s, epoch_level=epoch_level, print_lr=False, name=f"lr_{name}")
            for name, s in (lr_schedulers or {}).items()
            if s is not None
        ]

    def attach(self, engine: Engine) -> None:
        for handler in self.handlers:
            handler.attach(engine)
