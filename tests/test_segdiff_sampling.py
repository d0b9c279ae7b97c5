"""SegDiff's schedule and its sampling through the one reverse step: reference values, hand-computed ancestral and
DDIM steps, agreement with MONAI's DDPMScheduler / DDIMScheduler, caching of the image encoder."""

import math

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from bundle.diffusion.diffusion_sampler import DiffusionSampler, UncachedImageNetwork, make_sampler
from bundle.diffusion.reverse_step import ReverseStep, spaced_timesteps
from bundle.diffusion.segdiff_schedule import make_segdiff_scheduler
from bundle.inferers.ensemble import EnsembleInferer
from bundle.networks.segdiff import SegDiffNetwork

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks run fastest on one thread


def _network(conditioning="sum", seed=0):
    torch.manual_seed(seed)
    net = SegDiffNetwork(
        num_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        image_size=16,
        rrdb_blocks=1,
        rrdb_features=8,
        rrdb_growth=4,
        conditioning=conditioning,
    ).eval()
    with torch.no_grad():  # the output conv is zero-initialised: give it weights so eps depends on the inputs
        net.unet.out[2].conv.weight.normal_(0, 0.05)
    return net


def _generators(rows, seed=100):
    return [torch.Generator().manual_seed(seed + r) for r in range(rows)]


def test_reference_linear_schedule_values():
    abar = make_segdiff_scheduler(100).alphas_cumprod
    assert abar[0].item() == pytest.approx(0.999, rel=1e-6)  # t = 1
    assert abar[49].item() == pytest.approx(0.0742, rel=2e-3)  # t = 50
    assert abar[99].item() == pytest.approx(2.04e-5, rel=5e-3)  # t = 100
    betas = make_segdiff_scheduler(100).betas
    assert betas[0].item() == pytest.approx(1e-3) and betas[-1].item() == pytest.approx(0.2)
    paper = make_segdiff_scheduler(100, betas="paper").betas
    assert paper[0].item() == pytest.approx(1e-4) and paper[-1].item() == pytest.approx(2e-2)
    with pytest.raises(ValueError, match="betas"):
        make_segdiff_scheduler(100, betas="cosine")
    with pytest.raises(ValueError, match="no signal left"):
        make_segdiff_scheduler(20)


def test_ddpm_step_equals_hand_computation_and_monai():
    scheduler = make_segdiff_scheduler(100)
    sampler = ReverseStep(scheduler)
    i = 49
    x_t, eps = torch.full((1, 1, 2, 2), 0.3), torch.full((1, 1, 2, 2), -0.5)
    noise = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    # by hand, from beta_1..beta_50 = linspace(1e-3, 0.2, 100)[:50]
    betas = [1e-3 + k * (0.2 - 1e-3) / 99 for k in range(100)]
    abar = math.prod(1 - b for b in betas[: i + 1])
    abar_prev = abar / (1 - betas[i])
    x0 = (0.3 - math.sqrt(1 - abar) * -0.5) / math.sqrt(abar)
    mean = (
        math.sqrt(abar_prev) * betas[i] / (1 - abar) * x0 + math.sqrt(1 - betas[i]) * (1 - abar_prev) / (1 - abar) * 0.3
    )
    expected = mean + math.sqrt(betas[i]) * noise  # fixed-large variance: sigma^2 = beta_t
    out = sampler(eps, i, i - 1, x_t, noise)
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-5)
    # MONAI's DDPMScheduler.step draws the same noise from the same generator
    gen = torch.Generator().manual_seed(3)
    monai_out, _ = scheduler.step(eps, i, x_t, generator=gen)
    drawn = torch.randn((1, 1, 2, 2), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sampler(eps, i, i - 1, x_t, drawn), monai_out, rtol=1e-5, atol=1e-6)
    # the last step adds no noise and returns the posterior mean
    monai_last, _ = scheduler.step(eps, 0, x_t)
    torch.testing.assert_close(sampler(eps, 0, -1, x_t, None), monai_last, rtol=1e-5, atol=1e-6)


def test_ddim_step_equals_hand_computation_and_monai():
    scheduler = make_segdiff_scheduler(100)
    timesteps = DiffusionSampler(scheduler, num_steps=25, eta=0.0).timesteps
    assert timesteps[:3] == [99, 95, 91] and timesteps[-1] == 0 and len(timesteps) == 25
    sampler = ReverseStep(scheduler, eta=0.0, clip_x0=False)
    x_t, eps = torch.full((1, 1, 2, 2), 0.3), torch.full((1, 1, 2, 2), -0.5)
    abar, abar_prev = float(scheduler.alphas_cumprod[99]), float(scheduler.alphas_cumprod[95])
    x0 = (0.3 + 0.5 * math.sqrt(1 - abar)) / math.sqrt(abar)
    expected = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * -0.5
    torch.testing.assert_close(sampler(eps, 99, 95, x_t, None), torch.full_like(x_t, expected), rtol=1e-4, atol=1e-5)
    # MONAI's DDIMScheduler with 25 inference steps maps 99 -> 95 as well (eta = 0 and eta = 1)
    monai_ddim = DDIMScheduler(100, schedule="linear_beta", beta_start=1e-3, beta_end=0.2, clip_sample=False)
    monai_ddim.set_timesteps(25)
    torch.testing.assert_close(sampler(eps, 99, 95, x_t, None), monai_ddim.step(eps, 99, x_t)[0], rtol=1e-5, atol=1e-6)
    # the default clamps x0_hat to [-1, 1] as MONAI's clip_sample=True
    clipping = DDIMScheduler(100, schedule="linear_beta", beta_start=1e-3, beta_end=0.2, clip_sample=True)
    clipping.set_timesteps(25)
    clipped = ReverseStep(scheduler, eta=0.0, clip_x0=True)(eps, 99, 95, x_t, None)
    torch.testing.assert_close(clipped, clipping.step(eps, 99, x_t)[0], rtol=1e-5, atol=1e-6)
    expected_clipped = math.sqrt(abar_prev) * 1.0 + math.sqrt(1 - abar_prev) * -0.5  # x0_hat = 177 -> 1
    torch.testing.assert_close(clipped, torch.full_like(x_t, expected_clipped), rtol=1e-4, atol=1e-5)
    noisy = ReverseStep(scheduler, eta=1.0, clip_x0=False)
    drawn = torch.randn((1, 1, 2, 2), generator=torch.Generator().manual_seed(5))
    monai_noisy = monai_ddim.step(eps, 99, x_t, eta=1.0, generator=torch.Generator().manual_seed(5))[0]
    torch.testing.assert_close(noisy(eps, 99, 95, x_t, drawn), monai_noisy, rtol=1e-5, atol=1e-6)
    assert spaced_timesteps(100, 100) == spaced_timesteps(100) == list(range(99, -1, -1))
    with pytest.raises(ValueError, match="needs DDIM"):
        DiffusionSampler(scheduler, num_steps=25)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_cached_batched_sampling_equals_uncached_sequential_sampling(method):
    """The project's path (encoder once, generations batched) equals the reference loop for the same noise."""
    net, image = _network(), torch.randn(1, 3, 16, 16)
    scheduler = make_segdiff_scheduler(25)  # a short chain keeps the test fast; the maths is T-independent
    sampler = make_sampler(scheduler, method, num_steps=5, eta=1.0)
    calls = []
    encode = net.encode_image
    net.encode_image = lambda x: calls.append(x.shape[0]) or encode(x)
    features = sampler.encode(net, image)
    cached = sampler.chain(net, features.expand(3, -1, -1, -1), (1, 16, 16), _generators(3))
    assert calls == [1]
    naive = UncachedImageNetwork(net)
    one_by_one = torch.cat([sampler.chain(naive, image, (1, 16, 16), _generators(3)[r : r + 1]) for r in range(3)])
    steps = 25 if method == "ddpm" else 5
    assert calls == [1] + [1] * steps * 3  # the reference loop runs the encoder at every step of every generation
    torch.testing.assert_close(cached, one_by_one, rtol=1e-4, atol=1e-4)
    assert (cached[0] - cached[1]).abs().max() > 1e-2  # generations differ, so the equality is not trivial


def test_ensemble_inferer_runs_segdiff_unchanged():
    net = _network()
    inferer = EnsembleInferer(
        make_sampler(make_segdiff_scheduler(25), "ddim", num_steps=3),
        num_generations=2,
        outputs=("mean", "uncertainty"),
        roi_size=(16, 16),
        seed=0,
    )
    out = inferer(torch.randn(1, 3, 32, 32), net)
    assert out["mean"].shape == (1, 1, 32, 32) and 0 <= out["mean"].min() and out["mean"].max() <= 1
    assert out["uncertainty"].max() > 0


def test_v_prediction_trains_on_monais_velocity_and_samples_with_monais_ddim_step():
    scheduler = make_segdiff_scheduler(100, prediction_type="v_prediction")
    assert scheduler.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        make_segdiff_scheduler(100, prediction_type="sample")
    from bundle.engines.steps.denoising import DenoisingStep

    x0 = torch.tensor([[[[1.0, -1.0], [-1.0, 1.0]]]])
    noise = torch.tensor([[[[0.3, -0.7], [1.2, 0.1]]]])
    index = torch.tensor([70])
    abar = float(scheduler.alphas_cumprod[70])
    velocity = math.sqrt(abar) * noise - math.sqrt(1 - abar) * x0  # v = sqrt(abar) eps - sqrt(1 - abar) x0
    torch.testing.assert_close(DenoisingStep(scheduler).target(x0, noise, index), velocity)
    # a network that outputs the true v recovers x0 in one deterministic DDIM step from any signal level
    x_t = scheduler.add_noise(x0, noise, index)
    step = ReverseStep(scheduler, eta=0.0, clip_x0=False)
    abar_prev = float(scheduler.alphas_cumprod[30])
    expected = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * noise
    torch.testing.assert_close(step(velocity, 70, 30, x_t, None), expected, rtol=1e-4, atol=1e-5)
    monai_ddim = DDIMScheduler(
        100, schedule="linear_beta", beta_start=1e-3, beta_end=0.2, clip_sample=False, prediction_type="v_prediction"
    )
    monai_ddim.set_timesteps(25)
    torch.testing.assert_close(
        step(velocity, 99, 95, x_t, None), monai_ddim.step(velocity, 99, x_t)[0], rtol=1e-5, atol=1e-6
    )
