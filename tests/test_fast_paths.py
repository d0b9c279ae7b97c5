"""The GPU fast-path switches run on CPU too: bf16 autocast in the cDAL step and channels_last weights."""

import math

import torch

from bundle.diffusion.cdal_schedule import make_cdal_scheduler
from bundle.engines.steps.cdal import CDALStep
from bundle.engines.trainer import SegmentationTrainer
from bundle.networks.cdal import CDALDiscriminator, CDALGenerator
from bundle.runtime import prepare_network, unwrap_network


def _nets():
    torch.manual_seed(0)
    gen = CDALGenerator(
        num_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        image_size=16,
        cond_enc_layers=1,
        nz=8,
        z_emb_dim=16,
    )
    disc = CDALDiscriminator(ngf=8, channel_mult=(2, 4))
    return gen, disc


def test_bf16_autocast_and_channels_last_train_steps():
    gen, disc = _nets()
    gen = prepare_network(gen, "cpu", channels_last=True)
    disc = prepare_network(disc, "cpu", channels_last=True)
    convs = [p for p in unwrap_network(gen).parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)
    batch = {"image": torch.randn(4, 3, 16, 16), "label": (torch.rand(4, 1, 16, 16) > 0.5).float() * 2 - 1}
    before = [p.detach().clone() for p in gen.parameters()]
    trainer = SegmentationTrainer(
        "cpu",
        1,
        [batch, batch],
        CDALStep(make_cdal_scheduler(4), attention_scale=1, lazy_reg=1),
        networks={"generator": gen, "discriminator": disc},
        optimizers={
            "generator": torch.optim.Adam(gen.parameters(), 1e-3),
            "discriminator": torch.optim.Adam(disc.parameters(), 1e-3),
        },
        amp=True,
        amp_kwargs={"dtype": torch.bfloat16},
    )
    trainer.run()
    losses = trainer.state.output["losses"]
    assert set(losses) == {"loss_g", "loss_d", "loss_d_real", "loss_d_fake", "r1"}
    assert all(math.isfinite(v) for v in losses.values())
    assert losses["r1"] > 0  # lazy_reg = 1: the R1 penalty ran through the autocast forward
    assert any((p.detach() - b).abs().max() > 0 for p, b in zip(gen.parameters(), before))
