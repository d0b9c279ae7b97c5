"""SegDiff's linear noise schedule held by MONAI's ``DDPMScheduler`` (eps prediction, T = 100).

Two linear beta ranges are selectable (METHODS.md section 2):
- ``"reference"``: the reference code's improved-diffusion "linear" schedule, rescaled by 1000 / T, i.e.
  beta_t = linspace(0.1 / T, 20 / T, T); for T = 100 that is linspace(1e-3, 0.2, 100), giving
  alphas_cumprod at t = 1, 50, 100 of 0.999, 0.0742 and 2.04e-5.
- ``"paper"``: eq. 14 of the SegDiff paper, linspace(1e-4, 2e-2, T) without rescaling (for T = 100 the last
  signal level is still about 0.36, so x_T is far from pure noise).

Both are MONAI's built-in ``linear_beta`` schedule with explicit ``beta_start``/``beta_end``; index convention as in
``bundle.diffusion.cdal_schedule`` (``alphas_cumprod[i]`` is the signal level of x_{i+1}).
"""

from __future__ import annotations

from monai.networks.schedulers import DDPMScheduler

BETA_RANGES = ("reference", "paper")


def linear_beta_range(num_timesteps: int, betas: str = "reference") -> tuple[float, float]:
    """(beta_start, beta_end) of the named SegDiff beta range for T = ``num_timesteps``."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if betas == "reference":
        scale = 1000.0 / num_timesteps
        if 2e-2 * scale >= 1.0:
            raise ValueError(
                f"the reference linear schedule rescales linspace(1e-4, 2e-2) by 1000 / T; T = {num_timesteps} gives "
                f"beta_T = {2e-2 * scale:g} >= 1 (no signal left). Use T > 20 or betas='paper'."
            )
        return 1e-4 * scale, 2e-2 * scale
    if betas == "paper":
        return 1e-4, 2e-2
    raise ValueError(f"betas must be one of {BETA_RANGES}, got {betas!r}")


def make_segdiff_scheduler(
    num_timesteps: int = 100,
    betas: str = "reference",
    variance_type: str = "fixed_large",
    prediction_type: str = "epsilon",
) -> DDPMScheduler:
    """MONAI ``DDPMScheduler`` with SegDiff's linear schedule, eps prediction and no clipping of x0.

    Args:
        num_timesteps: T (100 in the reference).
        betas: ``"reference"`` (linspace(0.1 / T, 20 / T)) or ``"paper"`` (linspace(1e-4, 2e-2), eq. 14).
        variance_type: reverse-step variance, ``"fixed_large"`` (sigma^2 = beta_t, the reference) or
            ``"fixed_small"`` (the true posterior variance).
        prediction_type: what the network predicts: ``"epsilon"`` (the reference) or ``"v_prediction"``
            (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022). With the reference schedule abar_50 = 0.074
            and abar_100 = 2e-5, so the eps loss carries almost no signal about x0 in the second half of the chain
            (its weight on the x0 error is abar / (1 - abar)); v's weight is 1 / (1 - abar) >= 1 there, which a short
            (CPU) training needs (docs/results.md, Hippocampus). Same network, schedule and samplers.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    beta_start, beta_end = linear_beta_range(num_timesteps, betas)
    if variance_type not in ("fixed_large", "fixed_small"):
        raise ValueError(f"variance_type must be 'fixed_large' or 'fixed_small', got {variance_type!r}")
    return DDPMScheduler(
        num_train_timesteps=num_timesteps,
        schedule="linear_beta",
        variance_type=variance_type,
        prediction_type=prediction_type,
        clip_sample=False,
        beta_start=beta_start,
        beta_end=beta_end,
    )
