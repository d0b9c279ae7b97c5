"""The one reverse-diffusion step of every method: cDAL's posterior step, SegDiff's ancestral step and DDIM.

The three differ only in what the network predicts and in the variance of the noise they add, so one
``ReverseStep`` serves them, driven by the MONAI scheduler that holds the schedule:

- ``scheduler.prediction_type``: ``"sample"`` (cDAL: the network predicts x0), ``"epsilon"`` (SegDiff: the noise)
  or ``"v_prediction"``; the step turns the prediction into x0_hat (clipped to ``clip_sample_values`` when
  ``clip_x0``) and into the implied noise eps_hat;
- ``eta=None`` (ancestral, DDPM): the mean of q(x_s | x_t, x0_hat) with the scheduler's ``variance_type``:
  ``fixed_small`` = the true posterior variance (cDAL), ``fixed_large`` = beta_{t|s} = 1 - abar_t / abar_s
  (SegDiff's reference);
- ``eta`` a number (DDIM, Song et al. 2021): x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat
  + sigma z with sigma^2 = eta^2 x the posterior variance (eta = 1 gives the posterior mean and variance again).

These are the formulas of MONAI's ``DDPMScheduler.step`` and ``DDIMScheduler.step`` (the tests check the numbers
against both); the step is written here rather than called there because those draw one noise tensor for the whole
batch, and the ensembles need noise per row (``bundle.runtime.randn_rows``), and because training draws a
different time index per sample.

Index convention (shared with MONAI's ``DDPMScheduler``): ``alphas_cumprod[i]`` is the signal level of the noisy
label ``x_{i+1}``; a network called with time index ``i`` sees ``x_{i+1}``; a step goes from index ``i`` to a
smaller index ``s`` (``s = i - 1`` for consecutive steps), and ``s = -1`` is the clean label (abar = 1), where no
noise is added. Indices are Python ints (one for the whole batch) or long tensors (B,) (one per sample).
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import Scheduler

__all__ = ["ReverseStep", "spaced_timesteps"]

PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large")


def spaced_timesteps(num_train_timesteps: int, num_steps: int | None = None) -> list[int]:
    """Time indices of a sampling chain, most noisy first: all T (``None``) or round(linspace(T - 1, 0, num_steps)).

    They always start at T - 1 and end at 0; for T = 100 and 25 steps the spacing is 4 or 5.
    """
    if num_steps is None or num_steps == num_train_timesteps:
        return list(range(num_train_timesteps - 1, -1, -1))
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if num_steps == 1:
        return [num_train_timesteps - 1]
    steps = torch.linspace(num_train_timesteps - 1, 0, num_steps, dtype=torch.float64).round().long().tolist()
    if len(set(steps)) != len(steps):
        raise ValueError(f"{num_steps} steps of T = {num_train_timesteps} repeat a time index: {steps}")
    return steps


class ReverseStep:
    """x_s from x_t and the network's prediction at time index t (see the module docstring).

    Args:
        scheduler: a MONAI scheduler (``DDPMScheduler`` / ``DDIMScheduler``) holding the schedule; its
            ``prediction_type``, ``variance_type`` (DDPM; DDIM schedulers count as ``fixed_small``),
            ``clip_sample`` and ``clip_sample_values`` are read.
        eta: None for the ancestral (DDPM) step; a number >= 0 for DDIM (0: deterministic).
        clip_x0: clamp x0_hat to the scheduler's ``clip_sample_values`` (default [-1, 1]); None follows the
            scheduler's ``clip_sample``.
    """

    def __init__(self, scheduler: Scheduler, eta: float | None = None, clip_x0: bool | None = None) -> None:
        self.prediction_type = str(getattr(scheduler, "prediction_type", "epsilon"))
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        self.variance_type = str(getattr(scheduler, "variance_type", "fixed_small"))
        if eta is None and self.variance_type not in VARIANCE_TYPES:
            raise ValueError(f"the ancestral step supports variance_type {VARIANCE_TYPES}, got {self.variance_type!r}")
        if eta is not None and eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = None if eta is None else float(eta)
        self.clip_x0 = bool(getattr(scheduler, "clip_sample", False)) if clip_x0 is None else bool(clip_x0)
        self.clip_range = tuple(float(v) for v in getattr(scheduler, "clip_sample_values", (-1.0, 1.0)))
        alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float64)
        self.num_train_timesteps = len(alphas_cumprod)
        # abar at index -1 (the clean label) is 1: the table is shifted by one
        self._abar = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod])
        self._scalars: dict[tuple[int, int], tuple[float, ...]] = {}

    # ------------------------------------------------------------------------------------------- the schedule
    def alpha_cumprod(self, index: int | torch.Tensor) -> torch.Tensor:
        """abar at time index ``index`` (-1: 1.0), float64 on the CPU, the shape of ``index``."""
        idx = torch.as_tensor(index, dtype=torch.long).cpu()
        if (idx < -1).any() or (idx >= self.num_train_timesteps).any():
            raise ValueError(f"time index out of [-1, {self.num_train_timesteps - 1}]: {idx.tolist()}")
        return self._abar[idx + 1]

    def coefficients(self, index: int | torch.Tensor, prev_index: int | torch.Tensor):
        """(coef_x0, coef_xt, posterior variance, ancestral variance) of the step index -> prev_index, float64.

        coef_x0 x0 + coef_xt x_t is the mean of the posterior q(x_s | x_t, x0); its variance is
        (1 - abar_s) / (1 - abar_t) beta_{t|s}. The ancestral step adds the posterior variance clipped below at 1e-20
        (as the reference clips its log) for ``fixed_small``, beta_{t|s} for ``fixed_large``; both are 0 where
        s = -1.
        """
        abar_t, abar_s = self.alpha_cumprod(index), self.alpha_cumprod(prev_index)
        if (abar_s < abar_t).any():
            raise ValueError(f"a reverse step goes to a smaller time index, got {index} -> {prev_index}")
        alpha_ts = abar_t / abar_s
        beta_ts = 1.0 - alpha_ts
        coef_x0 = abar_s.sqrt() * beta_ts / (1.0 - abar_t)
        coef_xt = alpha_ts.sqrt() * (1.0 - abar_s) / (1.0 - abar_t)
        last = torch.as_tensor(prev_index).cpu() < 0
        posterior = torch.where(last, torch.zeros_like(beta_ts), (1.0 - abar_s) / (1.0 - abar_t) * beta_ts)
        ancestral = beta_ts if self.variance_type == "fixed_large" else posterior.clamp(min=1e-20)
        ancestral = torch.where(last, torch.zeros_like(ancestral), ancestral)
        return coef_x0, coef_xt, posterior, ancestral

    def scalars(self, index: int, prev_index: int) -> tuple[float, ...]:
        """(abar_t, abar_s, coef_x0, coef_xt, posterior, ancestral) of one step as Python floats, cached.

        A sampling chain (one time index for the whole batch) uses these, so its graph holds no tensor-valued
        branches: TorchScript tracing and ``torch.export`` see only the arithmetic on the samples.
        ``DiffusionSampler`` fills the cache for its chain when it is built.
        """
        key = (int(index), int(prev_index))
        if key not in self._scalars:
            abar_t, abar_s = self.alpha_cumprod(key[0]), self.alpha_cumprod(key[1])
            terms = (abar_t, abar_s, *self.coefficients(*key))
            self._scalars[key] = tuple(float(v) for v in terms)
        return self._scalars[key]

    def _terms(self, index: int | torch.Tensor, prev_index: int | torch.Tensor, like: torch.Tensor) -> tuple:
        """The step's schedule terms: floats for one index per batch, per-sample tensors like ``like`` otherwise."""
        if isinstance(index, int) and isinstance(prev_index, int):
            return self.scalars(index, prev_index)
        terms = (self.alpha_cumprod(index), self.alpha_cumprod(prev_index), *self.coefficients(index, prev_index))
        return tuple(_like(v, like) for v in terms)

    # ------------------------------------------------------------------------------------------ the step
    def predicted_x0(
        self, output: torch.Tensor, x_t: torch.Tensor, abar: float | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from the network output at signal level ``abar`` (a float, or per-sample values
        broadcastable over x_t); x0_hat clipped if ``clip_x0``."""
        signal, noise = abar**0.5, (1.0 - abar) ** 0.5
        if self.prediction_type == "sample":
            x0 = output
            eps = (x_t - signal * x0) / noise
        elif self.prediction_type == "epsilon":
            eps = output
            x0 = (x_t - noise * eps) / signal
        else:  # v_prediction
            x0 = signal * x_t - noise * output
            eps = noise * x_t + signal * output
        if self.clip_x0:
            x0 = x0.clamp(*self.clip_range)
        return x0, eps

    def needs_noise(self, prev_index: int) -> bool:
        """Whether the step towards ``prev_index`` (an int) adds noise."""
        return prev_index >= 0 and (self.eta is None or self.eta > 0)

    def __call__(
        self,
        output: torch.Tensor,
        index: int | torch.Tensor,
        prev_index: int | torch.Tensor,
        x_t: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_s for the network ``output`` at x_t (all (B, C, *spatial)); ``noise`` ~ N(0, I) like x_t.

        ``noise`` may be None only where no noise is added (``needs_noise``); rows whose ``prev_index`` is -1
        get none whatever is passed.
        """
        abar_t, abar_s, coef_x0, coef_xt, posterior, ancestral = self._terms(index, prev_index, x_t)
        x0, eps = self.predicted_x0(output, x_t, abar_t)
        if self.eta is None:
            mean = coef_x0 * x0 + coef_xt * x_t
            variance = ancestral
        else:
            variance = self.eta**2 * posterior
            direction = 1.0 - abar_s - variance
            direction = max(direction, 0.0) if isinstance(direction, float) else direction.clamp(min=0)
            mean = abar_s**0.5 * x0 + direction**0.5 * eps
        adds_noise = variance > 0 if isinstance(variance, float) else bool((variance > 0).any())
        if adds_noise:
            if noise is None:
                raise ValueError(f"the step from time index {index} to {prev_index} needs noise")
            mean = mean + variance**0.5 * noise
        return mean


def _like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample float64 coefficients (B,) or a scalar, as ``like``'s dtype/device, broadcastable over it."""
    values = values.to(device=like.device, dtype=like.dtype)
    return values.reshape(-1, *([1] * (like.ndim - 1))) if values.ndim == 1 else values
