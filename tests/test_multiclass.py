"""Multi-class (C > 1 label channels, each in {-1, 1}) through the trainer's steps, the ensemble inferer (2-D and
slice-wise 3-D, every kind of sampler) and the metrics."""

from __future__ import annotations

import pytest
import torch

from bundle.diffusion.cdal_schedule import make_cdal_scheduler
from bundle.diffusion.diffusion_sampler import DiffusionSampler, make_sampler
from bundle.engines.steps.cdal import CDALStep
from bundle.engines.trainer import SegmentationTrainer
from bundle.inferers.ensemble import EnsembleInferer
from bundle.inferers.samplers import DeterministicSampler, LatentSampler
from bundle.metrics.binary import PerImageBinaryMetric
from bundle.networks.cdal import CDALDiscriminator, CDALGenerator
from bundle.transforms.volume import prepare_slice_batch, slices_to_volumes, volumes_to_slices

CLASSES = 3


def _generator(seed: int = 0) -> CDALGenerator:
    torch.manual_seed(seed)
    net = CDALGenerator(
        label_channels=CLASSES,
        image_channels=1,
        num_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        image_size=16,
        cond_enc_layers=1,
        nz=8,
        z_emb_dim=16,
    )
    with torch.no_grad():  # the zero-initialised head would make every sample identical
        net.head_conv.weight.normal_(0, 0.05)
    return net


def _onehot_volume(shape=(2, 16, 16, 4), seed: int = 0) -> torch.Tensor:
    """(B, 3, H, W, D) one-hot labels in {-1, 1} from random class maps."""
    classes = torch.randint(0, CLASSES, shape, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.one_hot(classes, CLASSES).permute(0, 4, 1, 2, 3).float() * 2 - 1


def test_slices_round_trip():
    volumes = torch.randn(2, 3, 5, 6, 4)
    slices = volumes_to_slices(volumes)
    assert slices.shape == (8, 3, 5, 6)
    torch.testing.assert_close(slices[5], volumes[1, :, :, :, 1])  # volume-major, then slice index
    torch.testing.assert_close(slices_to_volumes(slices, 4), volumes)


def test_cdal_trainer_learns_step_on_slices_of_three_class_crops():
    """Batches of 3-D crops with 3 one-hot channels, sliced by prepare_slice_batch, through both cDAL updates."""
    generator = _generator()
    discriminator = CDALDiscriminator(label_channels=CLASSES, ngf=4, channel_mult=(2, 4), downsample_first=False)
    labels = _onehot_volume()
    images = labels[:, 1:2] * 0.5 + 0.1 * torch.randn(2, 1, 16, 16, 4)
    batches = [{"image": images, "label": labels}] * 2
    before_g = [p.detach().clone() for p in generator.parameters()]
    before_d = [p.detach().clone() for p in discriminator.parameters()]
    trainer = SegmentationTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=batches,
        step=CDALStep(make_cdal_scheduler(2), attention_scale=2, lazy_reg=1),
        networks={"generator": generator, "discriminator": discriminator},
        optimizers={
            "generator": torch.optim.Adam(generator.parameters(), 1e-3),
            "discriminator": torch.optim.Adam(discriminator.parameters(), 1e-3),
        },
        prepare_batch=prepare_slice_batch,
    )
    trainer.run()
    out = trainer.state.output
    assert out["image"].shape == (8, 1, 16, 16) and out["label"].shape == (8, CLASSES, 16, 16)
    assert out["losses"]["r1"] > 0
    assert 0 < out["losses"]["loss_g"] < 4  # mean squared error of x0 in [-1, 1]
    assert any(not torch.equal(a, b) for a, b in zip(before_g, generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_d, discriminator.parameters()))


def test_ensemble_inferer_returns_every_class_channel():
    net = _generator().eval()
    inferer = EnsembleInferer(
        DiffusionSampler(make_cdal_scheduler(2)), num_generations=3, outputs=("mean", "uncertainty", "samples"), seed=0
    )
    out = inferer(torch.randn(2, 1, 16, 16), net)
    assert out["mean"].shape == (2, CLASSES, 16, 16) and out["uncertainty"].shape == (2, CLASSES, 16, 16)
    assert out["samples"].shape == (2, 3 * CLASSES, 16, 16)
    samples = out["samples"].reshape(2, 3, CLASSES, 16, 16)  # generation-major, then class
    torch.testing.assert_close(out["mean"], samples.mean(1))
    assert float(out["uncertainty"].max()) > 0 and 0 <= float(out["mean"].min()) <= float(out["mean"].max()) <= 1


def test_slice_inferer_reassembles_per_slice_ensembles_exactly():
    """A (1, 1, 16, 16, 3) volume: one 16x16 window per slice, so the output is the 2-D ensemble of its 3 slices."""
    net = _generator().eval()
    volume = torch.randn(1, 1, 16, 16, 3)
    sampler = DiffusionSampler(make_cdal_scheduler(2))
    sliced = EnsembleInferer(
        sampler,
        num_generations=2,
        outputs="mean",
        roi_size=(16, 16),
        overlap=0.0,
        sw_batch_size=3,
        slice_axis=2,
        seed=5,
    )(volume, net)
    assert sliced.shape == (1, CLASSES, 16, 16, 3)
    reference = EnsembleInferer(sampler, num_generations=2, outputs="mean", seed=5)
    per_slice = reference(volumes_to_slices(volume), net)  # the same seeded stream, slices in window order
    torch.testing.assert_close(torch.as_tensor(sliced), slices_to_volumes(per_slice, 3), atol=1e-5, rtol=1e-5)
    # a volume larger than the window is tiled in-plane and keeps its size
    wide = EnsembleInferer(
        sampler,
        num_generations=1,
        outputs=("mean", "uncertainty"),
        roi_size=(16, 16),
        overlap=0.5,
        slice_axis=2,
        seed=1,
    )(torch.randn(1, 1, 20, 16, 2), net)
    assert wide["mean"].shape == (1, CLASSES, 20, 16, 2) and wide["uncertainty"].shape == (1, CLASSES, 20, 16, 2)
    # a 2-D inferer refuses a volume rather than guessing how to cut it
    with pytest.raises(ValueError, match="slice_axis"):
        EnsembleInferer(sampler, num_generations=1)(volume, net)


def test_every_kind_of_network_is_inferred_slice_wise():
    """The U-Net (deterministic), the Probabilistic U-Net and MoSE (latent samplers) on a 3-class volume."""
    from bundle.networks.mose import MixtureOfStochasticExperts
    from bundle.networks.prob_unet import ProbabilisticUNet
    from bundle.networks.unet_baseline import BaselineUNet

    torch.manual_seed(0)
    volume = torch.randn(1, 1, 20, 16, 3)
    cases = [
        (BaselineUNet(1, CLASSES, channels=(4, 8), strides=(2,), num_res_units=1), DeterministicSampler()),
        (ProbabilisticUNet(1, CLASSES, num_channels=(4, 8), latent_dim=2, num_fcomb_layers=1), LatentSampler()),
        (MixtureOfStochasticExperts(1, CLASSES, num_channels=(4, 8), num_experts=2), LatentSampler()),
    ]
    for net, sampler in cases:
        out = EnsembleInferer(
            sampler,
            num_generations=2,
            outputs=("mean", "uncertainty", "samples"),
            roi_size=(16, 16),
            overlap=0.5,
            slice_axis=2,
            seed=0,
        )(volume, net.eval())
        name = type(net).__name__
        assert out["mean"].shape == (1, CLASSES, 20, 16, 3), name
        assert out["samples"].shape == (1, 2 * CLASSES, 20, 16, 3), name
        assert 0 <= float(out["mean"].min()) and float(out["mean"].max()) <= 1, name
        if isinstance(sampler, DeterministicSampler):
            assert float(out["uncertainty"].max()) == 0.0
        else:
            assert float(out["uncertainty"].max()) > 0, name
    # MoSE's classes are a softmax over the label channels: they sum to one
    torch.testing.assert_close(out["mean"].sum(1), torch.ones(1, 20, 16, 3), atol=1e-5, rtol=0)


def test_per_image_metric_keeps_one_row_per_class():
    pred = torch.zeros(2, 2, 4, 4)
    label = torch.zeros(2, 2, 4, 4)
    pred[0, 0, :2] = 1  # image 0, class 0: 8 predicted, 4 true, 4 shared -> Dice 2*4/(8+4)
    label[0, 0, 0] = 1
    pred[1, 1, 0] = label[1, 1, 0] = 1  # image 1, class 1: perfect
    label[0, 1, 3] = 1  # image 0, class 1: missed entirely
    metric = PerImageBinaryMetric("dice")
    metric(pred, label * 2 - 1)
    rows = metric.get_buffer()
    assert rows.shape == (2, 2)
    torch.testing.assert_close(rows[0], torch.tensor([2 * 4 / 12, 0.0]))
    assert float(rows[1, 1]) == 1.0 and float(rows[1, 0]) == 0.0  # both empty scores 0, as the reference


def test_segdiff_trains_and_samples_three_class_slices():
    """SegDiff (written alongside) with 3 label channels: one eps step on sliced 3-D crops, then a DDIM ensemble."""
    from bundle.diffusion.segdiff_schedule import make_segdiff_scheduler
    from bundle.engines.steps.denoising import DenoisingStep
    from bundle.networks.segdiff import SegDiffNetwork

    torch.manual_seed(0)
    net = SegDiffNetwork(
        label_channels=CLASSES,
        image_channels=1,
        num_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        image_size=16,
        rrdb_blocks=1,
        rrdb_features=8,
        rrdb_growth=8,
        norm_num_groups=8,
    )
    scheduler = make_segdiff_scheduler(num_timesteps=50)
    labels = _onehot_volume(shape=(1, 16, 16, 4))
    batches = [{"image": labels[:, 1:2] + 0.1 * torch.randn(1, 1, 16, 16, 4), "label": labels}]
    before = [p.detach().clone() for p in net.parameters()]
    trainer = SegmentationTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=batches,
        step=DenoisingStep(scheduler),
        networks={"network": net},
        optimizers={"network": torch.optim.AdamW(net.parameters(), 1e-3)},
        prepare_batch=prepare_slice_batch,
    )
    trainer.run()
    assert trainer.state.output["label"].shape == (4, CLASSES, 16, 16) and torch.isfinite(trainer.state.output["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    inferer = EnsembleInferer(
        make_sampler(scheduler, "ddim", num_steps=2), num_generations=2, outputs=("mean", "uncertainty"), seed=0
    )
    out = inferer(torch.randn(2, 1, 16, 16), net.eval())
    assert out["mean"].shape == (2, CLASSES, 16, 16) and 0 <= float(out["mean"].min()) <= float(out["mean"].max()) <= 1
