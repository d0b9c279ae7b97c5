"""The EMA handler's warm-up: the average follows recent weights early on, then settles at the set decay."""

from __future__ import annotations

import torch
from torch import nn

from bundle.handlers.ema import ExponentialMovingAverage, averaged_copy


def _run(warmup: bool, steps: int) -> tuple[ExponentialMovingAverage, nn.Linear]:
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = ExponentialMovingAverage(net, averaged_copy(net), decay=0.999, warmup=warmup)
    for step in range(1, steps + 1):
        with torch.no_grad():
            net.weight.fill_(float(step))  # the trained weight walks 1, 2, ..., steps
        ema.update()
    return ema, net


def test_warmup_decay_schedule():
    ema, _ = _run(warmup=True, steps=0)
    decays = []
    for n in (0, 1, 10, 90, 9980, 100_000):
        ema.num_updates = n
        decays.append(ema.current_decay())
    assert decays == [0.1, 2 / 11, 11 / 20, 91 / 100, 0.999, 0.999]  # (1 + n) / (10 + n) reaches 0.999 at 8991
    plain, _ = _run(warmup=False, steps=0)
    assert plain.current_decay() == 0.999


def test_warmup_average_follows_recent_weights():
    steps = 200
    warm, _ = _run(warmup=True, steps=steps)
    cold, _ = _run(warmup=False, steps=steps)
    warm_value = float(warm.ema_network.weight)
    cold_value = float(cold.ema_network.weight)
    # without warm-up, 200 updates at 0.999 leave ~82 % of the weight on the initial 0 (the EMA ~ 18); with it the
    # average spans about the last tenth of the walk (close to its end, 200)
    assert cold_value < 25
    assert 170 < warm_value < steps
    assert warm.state_dict()["num_updates"] == steps
