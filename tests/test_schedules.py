"""The cDAL schedule and the one reverse step (bundle.diffusion.reverse_step) against the reference's float32 vectors
(METHODS.md 1.1) and MONAI's DDPMScheduler.step, for one time index per batch and one per sample."""

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from bundle.diffusion.cdal_schedule import ForwardDiffusion, make_cdal_scheduler
from bundle.diffusion.reverse_step import ReverseStep

VECTORS = {
    2: {
        "betas": [0.92132401, 0.99945104],
        "sqrt_abar": [1, 0.2804924, 0.0065719],
        "coef1": [1, 0.28035053],
        "coef2": [0, 0.02158743],
        "var": [0, 0.92085804],
    },
    4: {
        "betas": [0.4782553, 0.84920603, 0.95641768, 0.98740393],
        "sqrt_abar": [1, 0.722319, 0.28049237, 0.05855665, 0.00657194],
        "coef1": [1, 0.66577842, 0.26919086, 0.05782156],
        "coef2": [0, 0.20157625, 0.19300088, 0.11185222],
        "var": [0, 0.44081914, 0.88420243, 0.98406076],
    },
}


def posterior_coefficients(scheduler):
    """(coef_x0, coef_xt, variance) of every consecutive step, float32 (T,) each, as the reference lists them."""
    index = torch.arange(len(scheduler.alphas_cumprod))
    coef_x0, coef_xt, posterior, _ = ReverseStep(scheduler).coefficients(index, index - 1)
    return coef_x0.float(), coef_xt.float(), posterior.float()


@pytest.mark.parametrize("steps", [2, 4])
def test_schedule_and_posterior_match_reference(steps):
    ref = VECTORS[steps]
    scheduler = make_cdal_scheduler(steps)
    assert scheduler.betas.dtype == torch.float32
    torch.testing.assert_close(scheduler.betas, torch.tensor(ref["betas"]), atol=1e-6, rtol=0)
    sqrt_abar = torch.cat([torch.ones(1), scheduler.alphas_cumprod.sqrt()])
    torch.testing.assert_close(sqrt_abar, torch.tensor(ref["sqrt_abar"]), atol=1e-6, rtol=0)
    coef_x0, coef_xt, variance = posterior_coefficients(scheduler)
    torch.testing.assert_close(coef_x0, torch.tensor(ref["coef1"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(coef_xt, torch.tensor(ref["coef2"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(variance, torch.tensor(ref["var"]), atol=1e-6, rtol=0)


def test_monai_step_is_the_cdal_posterior_step():
    """DDPMScheduler(prediction_type='sample') with the registered schedule takes the same step as the posterior."""
    scheduler = make_cdal_scheduler(4)
    assert isinstance(scheduler, DDPMScheduler)
    coef_x0, coef_xt, variance = posterior_coefficients(scheduler)
    x0_hat, x = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8)
    for i in range(4):
        g = torch.Generator().manual_seed(i)
        monai_next, monai_x0 = scheduler.step(x0_hat, i, x, generator=g)
        noise = torch.randn(x0_hat.shape, generator=torch.Generator().manual_seed(i)) if i > 0 else 0
        ours = coef_x0[i] * x0_hat + coef_xt[i] * x + variance[i].sqrt() * noise
        torch.testing.assert_close(monai_next, ours, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(monai_x0, x0_hat)
    last, _ = scheduler.step(x0_hat, 0, x)
    torch.testing.assert_close(last, x0_hat, atol=1e-6, rtol=0)


def test_reverse_step_is_monais_step_for_one_index_and_per_sample_indices():
    """ReverseStep (x0 prediction, fixed_small) = MONAI's DDPMScheduler.step with the same noise; with one time index
    per sample (cDAL training) each row equals the step of its own index."""
    scheduler = make_cdal_scheduler(4)
    step = ReverseStep(scheduler)
    x0_hat, x = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8)
    for i in range(4):
        noise = torch.randn(x0_hat.shape, generator=torch.Generator().manual_seed(i))
        monai_next, _ = scheduler.step(x0_hat, i, x, generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(step(x0_hat, i, i - 1, x, noise), monai_next, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(step(x0_hat, 0, -1, x, None), x0_hat, atol=1e-6, rtol=0)
    index = torch.tensor([3, 0, 2, 1])
    noise = torch.randn(x0_hat.shape, generator=torch.Generator().manual_seed(9))
    per_sample = ForwardDiffusion(scheduler).posterior_sample(x0_hat, x, index, noise)
    for r, i in enumerate(index.tolist()):
        torch.testing.assert_close(
            per_sample[r : r + 1], step(x0_hat[r : r + 1], i, i - 1, x[r : r + 1], noise[r : r + 1])
        )
    torch.testing.assert_close(per_sample[1], x0_hat[1], atol=1e-6, rtol=0)  # index 0: the prediction itself
    with pytest.raises(ValueError, match="needs noise"):
        step(x0_hat, 2, 1, x, None)
    with pytest.raises(ValueError, match="smaller time index"):
        step(x0_hat, 1, 2, x, torch.zeros_like(x))


def test_forward_pairs_have_the_schedule_statistics():
    """x_i and x_{i+1} drawn by ForwardDiffusion.pair have the means and variances the schedule implies."""
    torch.manual_seed(0)
    diffusion = ForwardDiffusion(make_cdal_scheduler(4))
    x0 = torch.ones(20000, 1, 1, 1)
    for i in range(4):
        x_i, x_next = diffusion.pair(x0, torch.full((20000,), i))
        abar_prev = 1.0 if i == 0 else float(diffusion.alphas_cumprod[i - 1])
        abar = float(diffusion.alphas_cumprod[i])
        assert x_i.mean().item() == pytest.approx(abar_prev**0.5, abs=0.02)
        assert x_i.var().item() == pytest.approx(1 - abar_prev, abs=0.03)
        assert x_next.mean().item() == pytest.approx(abar**0.5, abs=0.02)
        assert x_next.var().item() == pytest.approx(1 - abar, abs=0.03)
    torch.testing.assert_close(diffusion.pair(x0[:4], torch.zeros(4, dtype=torch.long))[0], x0[:4])
