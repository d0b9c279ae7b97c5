"""Probabilistic U-Net: the KL term, prior sampling through the ensemble inferer, and a short training that learns."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events

from bundle.engines.steps.prob_unet import ProbUNetStep
from bundle.engines.trainer import SegmentationTrainer
from bundle.inferers.ensemble import EnsembleInferer
from bundle.inferers.samplers import LatentSampler
from bundle.networks.prob_unet import ProbabilisticUNet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks run fastest on one thread


def small_net(seed: int = 0) -> ProbabilisticUNet:
    torch.manual_seed(seed)
    return ProbabilisticUNet(
        image_channels=1, label_channels=1, num_channels=(8, 16), latent_dim=3, num_fcomb_layers=2, convs_per_block=2
    )


def toy_batch(batch: int = 4, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright squares on noise; the label is the square."""
    g = torch.Generator().manual_seed(seed)
    image = 0.1 * torch.randn(batch, 1, size, size, generator=g)
    label = torch.zeros(batch, 1, size, size)
    for b in range(batch):
        y, x = torch.randint(2, size - 8, (2,), generator=g).tolist()
        image[b, :, y : y + 6, x : x + 6] += 1.0
        label[b, :, y : y + 6, x : x + 6] = 1.0
    return image, label


def test_kl_is_zero_when_prior_and_posterior_are_equal():
    net = small_net()
    image, label = toy_batch()
    # the posterior net computes the prior net's function: same weights, the mask input channel switched off
    posterior = net.posterior_net.state_dict()
    for key, value in net.prior_net.state_dict().items():
        if posterior[key].shape == value.shape:
            posterior[key] = value.clone()
    first = "encoder.blocks.0.0.weight"
    posterior[first] = torch.cat([net.prior_net.state_dict()[first], torch.zeros_like(posterior[first][:, 1:])], 1)
    net.posterior_net.load_state_dict(posterior)
    kl = net.kl(image, label)
    assert kl.shape == (4,)
    torch.testing.assert_close(kl, torch.zeros(4), atol=1e-6, rtol=0)
    # an untrained posterior net of its own differs from the prior: KL > 0, and equals the closed form
    other = small_net(seed=1)
    q, p = other.posterior(image, label).base_dist, other.prior(image).base_dist
    closed = (torch.log(p.scale / q.scale) + (q.scale**2 + (q.loc - p.loc) ** 2) / (2 * p.scale**2) - 0.5).sum(-1)
    kl_other = other.kl(image, label)
    assert (kl_other > 1e-6).all()
    torch.testing.assert_close(kl_other, closed, atol=1e-6, rtol=1e-5)


def test_prior_samples_through_the_ensemble_inferer():
    net = small_net().eval()
    image, _ = toy_batch(batch=2)
    inferer = EnsembleInferer(LatentSampler(), num_generations=5, outputs=["mean", "uncertainty", "samples"], seed=3)
    out = inferer(image, net)
    assert out["samples"].shape == (2, 5, 16, 16) and out["mean"].shape == (2, 1, 16, 16)
    torch.testing.assert_close(out["mean"], out["samples"].mean(1, keepdim=True))
    torch.testing.assert_close(out["uncertainty"], out["samples"].std(1, unbiased=False, keepdim=True))
    assert float(out["uncertainty"].max()) > 0  # different z, different samples
    again = EnsembleInferer(LatentSampler(), num_generations=5, outputs="samples", seed=3)(image, net)
    torch.testing.assert_close(again, out["samples"])  # the seed fixes the prior draws
    # with no prior spread all samples coincide: the latent is the only randomness
    with torch.no_grad():
        net.prior_net.head.bias[3:] = -30.0  # log sigma -> sigma ~ 1e-13
    still = inferer(image, net)["uncertainty"]
    assert float(still.max()) < 1e-5


def test_short_training_reduces_the_loss():
    net = small_net()
    batches = [dict(zip(("image", "label"), toy_batch(batch=8, seed=s))) for s in range(4)]
    for b in batches:
        b["label"] = b["label"] * 2 - 1  # the bundle's {-1, 1} labels
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses: list[float] = []
    trainer = SegmentationTrainer(
        device="cpu",
        max_epochs=20,
        train_data_loader=batches,
        epoch_length=4,
        step=ProbUNetStep(beta=1.0),
        networks={"network": net},
        optimizers={"network": optimizer},
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["losses"]["loss_rec"]))
    trainer.run()
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"reconstruction loss per image: first epoch {first:.1f}, last epoch {last:.1f}")
    assert last < 0.2 * first
    assert set(trainer.state.output["losses"]) == {"loss", "loss_rec", "loss_kl"}
