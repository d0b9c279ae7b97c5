"""cDAL generator and discriminator: shapes, ranges, parameter count, caching, batch independence, gradients,
the blocks' in-place arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bundle.networks import blocks
from bundle.networks.blocks import AdaptiveGroupNorm, BigGANResBlock, FIRDownsample, FIRUpsample, SelfAttention2d
from bundle.networks.cdal import CDALDiscriminator, CDALGenerator

# small CPU profile (README quick start scale)
CPU_GENERATOR = dict(
    num_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_resolutions=(16,),
    image_size=64,
    cond_enc_layers=2,
    nz=32,
    z_emb_dim=64,
)
CPU_DISCRIMINATOR = dict(ngf=16, channel_mult=(2, 4, 4))
REFERENCE_GENERATOR_PARAMS = 41.7e6  # METHODS.md section 7, Hejrati/cDAL MoNuSeg generator


def randomize_zero_init(network: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Give the deliberately zero-initialised conv weights small random values (as after some training)."""
    with torch.no_grad():
        for param in network.parameters():
            if param.ndim > 1 and not param.any():
                param.normal_(0.0, std)
    return network


def generator_inputs(net: CDALGenerator, batch: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        x_t=torch.randn(batch, net.label_channels, size, size, generator=g),
        t=torch.randint(0, 4, (batch,), generator=g),
        z=torch.randn(batch, net.nz, generator=g),
        image=torch.randn(batch, net.image_channels, size, size, generator=g),
    )


@pytest.fixture(scope="module")
def cpu_generator() -> CDALGenerator:
    torch.manual_seed(0)
    return randomize_zero_init(CDALGenerator(**CPU_GENERATOR)).eval()


def test_paper_generator_parameter_count_shape_and_range() -> None:
    torch.manual_seed(0)
    net = CDALGenerator()  # MoNuSeg defaults
    count = sum(p.numel() for p in net.parameters())
    print(f"\ncDAL paper generator: {count / 1e6:.3f} M parameters (reference {REFERENCE_GENERATOR_PARAMS / 1e6} M)")
    assert abs(count - REFERENCE_GENERATOR_PARAMS) / REFERENCE_GENERATOR_PARAMS < 0.002  # 41.7 M rounded
    assert net.nz == 100 and net.label_channels == 1
    inputs = generator_inputs(net, 1, 64)  # smallest size the 7-level U-Net accepts
    with torch.no_grad():
        assert net(**inputs).abs().max() == 0  # zero-initialised head: tanh(0)
        out = randomize_zero_init(net)(**inputs)
    assert out.shape == (1, 1, 64, 64)
    assert out.abs().max() < 1 and out.std() > 0


def test_cpu_generator_shape_range_and_variants(cpu_generator: CDALGenerator) -> None:
    with torch.no_grad():
        out = cpu_generator(**generator_inputs(cpu_generator, 2, 64))
        assert out.shape == (2, 1, 64, 64)
        assert out.abs().max() < 1 and out.std() > 0
        plain = CDALGenerator(label_channels=3, image_channels=1, progressive_input="none", **CPU_GENERATOR)
        assert plain(**generator_inputs(plain, 2, 32)).shape == (2, 3, 32, 32)


def test_image_feature_caching_is_exact(cpu_generator: CDALGenerator) -> None:
    inputs = generator_inputs(cpu_generator, 2, 32)
    with torch.no_grad():
        direct = cpu_generator(**inputs)
        image = inputs.pop("image")
        features = cpu_generator.encode_image(image)
        cached = cpu_generator(**inputs, image_features=features)
    assert features.shape == (2, 32, 32, 32)
    assert torch.equal(direct, cached)


def test_generator_is_batch_independent(cpu_generator: CDALGenerator) -> None:
    inputs = generator_inputs(cpu_generator, 3, 32)
    with torch.no_grad():
        batched = cpu_generator(**inputs)
        singles = torch.cat([cpu_generator(**{k: v[i : i + 1] for k, v in inputs.items()}) for i in range(3)])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)


def test_generator_input_errors(cpu_generator: CDALGenerator) -> None:
    inputs = generator_inputs(cpu_generator, 1, 32)
    with pytest.raises(ValueError, match="exactly one"):
        cpu_generator(**inputs, image_features=cpu_generator.encode_image(inputs["image"]))
    with pytest.raises(ValueError, match="divisible by 4"):
        cpu_generator(**generator_inputs(cpu_generator, 1, 30))
    bad = dict(inputs, image=torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="image features"):
        cpu_generator(**bad)


def test_gradients_reach_every_generator_parameter() -> None:
    torch.manual_seed(1)
    fresh = CDALGenerator(**CPU_GENERATOR)
    inputs = generator_inputs(fresh, 2, 32)
    target = torch.rand(2, 1, 32, 32) * 2 - 1
    F.mse_loss(fresh(**inputs), target).backward()
    # at initialisation the zero head conv itself is trained (upstream gradients wait for it to move)
    assert fresh.head_conv.weight.grad.abs().sum() > 0

    net = randomize_zero_init(CDALGenerator(**CPU_GENERATOR))
    F.mse_loss(net(**inputs), target).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_adaptive_group_norm_equals_group_norm_at_init() -> None:
    torch.manual_seed(0)
    norm = AdaptiveGroupNorm(64, style_dim=16)
    x = torch.randn(2, 64, 8, 8)
    plain = F.group_norm(x, 16, eps=1e-6)  # min(64 // 4, 32) groups
    torch.testing.assert_close(norm(x, torch.zeros(2, 16)), plain)
    with torch.no_grad():
        norm.style.weight.zero_()
    torch.testing.assert_close(norm(x, torch.randn(2, 16)), plain)


def test_fir_resampling_preserves_constants() -> None:
    x = torch.full((1, 2, 8, 8), 0.7)
    down, up = FIRDownsample()(x), FIRUpsample()(x)
    assert down.shape == (1, 2, 4, 4) and up.shape == (1, 2, 16, 16)
    torch.testing.assert_close(down[..., 1:-1, 1:-1], torch.full((1, 2, 2, 2), 0.7))
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.full((1, 2, 12, 12), 0.7))
    # zero-padded border: the [1, 3, 3, 1] / 8 kernel loses 1/8 per side at a downsampled edge
    torch.testing.assert_close(down[0, 0, 0, 1], torch.tensor(0.7 * 7 / 8))


def test_discriminator_logits_and_small_batches() -> None:
    torch.manual_seed(0)
    net = CDALDiscriminator(**CPU_DISCRIMINATOR)
    for batch in (8, 6, 1):
        x_t, x_tp1 = torch.randn(2, batch, 1, 64, 64).unbind(0)
        logits = net(x_t, torch.randint(0, 4, (batch,)), x_tp1)
        assert logits.shape == (batch, 1) and torch.isfinite(logits).all()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(abs(float(c.weight.detach().std()) - 0.02) < 0.005 for c in convs if c.weight.numel() > 1000)


def test_discriminator_feature_taps_paper_layout() -> None:
    ngf = 8  # the paper's 6-block layout at reduced width to stay fast
    net = CDALDiscriminator(ngf=ngf)
    x_t, x_tp1 = torch.randn(2, 2, 1, 256, 256).unbind(0)
    with torch.no_grad():
        features = net.get_features(x_t, torch.tensor([0, 3]), x_tp1)
    shapes = [tuple(f.shape) for f in features]
    assert len(features) == 7
    assert shapes[0] == (2, 2 * ngf, 256, 256)
    assert shapes[2] == (2, 8 * ngf, 64, 64)
    assert shapes[3] == (2, 8 * ngf, 32, 32)
    assert shapes[-1] == (2, 8 * ngf, 4, 4)
    small = CDALDiscriminator(label_channels=3, ngf=ngf, channel_mult=(2, 4, 8, 8), downsample_first=False)
    with torch.no_grad():
        hippo = small.get_features(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), torch.randn(2, 3, 32, 32))
    assert tuple(hippo[2].shape) == (2, 4 * ngf, 16, 16)  # METHODS.md 1.3: hs[2] is 16 x 16 for Hippocampus


def _res_block_out_of_place(block: BigGANResBlock, x: torch.Tensor, temb: torch.Tensor, zemb: torch.Tensor):
    """The residual block written out of place, as the paper's reference reads."""
    h = F.silu(block.norm_0(x, zemb))
    if block.resample is not None:
        h, x = block.resample(h), block.resample(x)
    h = block.conv_0(h) + block.temb_proj(F.silu(temb))[:, :, None, None]
    h = block.conv_1(F.silu(block.norm_1(h, zemb)))
    return ((x if block.skip is None else block.skip(x)) + h) / 2**0.5


@pytest.mark.parametrize("resample", ["none", "down", "up", "channels"])
def test_res_block_in_place_arithmetic_is_exact_and_leaves_inputs_alone(resample: str) -> None:
    """The residual block sums and activates in place: its inputs are untouched, its gradients are the true ones
    (finite differences, float64), and under bf16 autocast its output has the out-of-place dtype (a float32
    residual stream stays float32)."""
    torch.manual_seed(0)
    block = BigGANResBlock(
        8, 12 if resample == "channels" else 8, temb_dim=6, zemb_dim=5, up=resample == "up", down=resample == "down"
    )
    randomize_zero_init(block).double()
    shapes = [(2, 8, 8, 8), (2, 6), (2, 5)]
    x, temb, zemb = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes)
    copies = [v.detach().clone() for v in (x, temb, zemb)]
    with torch.no_grad():
        out = block(x, temb, zemb)
    for value, copy in zip((x, temb, zemb), copies):
        assert torch.equal(value, copy)
    torch.testing.assert_close(out, _res_block_out_of_place(block, x, temb, zemb), rtol=1e-12, atol=1e-12)
    with torch.no_grad(), blocks.out_of_place_arithmetic():  # the benchmark's baseline arithmetic
        torch.testing.assert_close(block(x, temb, zemb), out, rtol=1e-12, atol=1e-12)
    assert blocks._IN_PLACE[0]
    assert torch.autograd.gradcheck(block, (x, temb, zemb), eps=1e-6, atol=1e-6)

    block.float()
    inputs = [v.detach().float() for v in (x, temb, zemb)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = block(*inputs), _res_block_out_of_place(block, *inputs)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.05, atol=0.05)


def test_attention_in_place_residual_is_exact() -> None:
    torch.manual_seed(0)
    attention = randomize_zero_init(SelfAttention2d(8)).double()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    copy = x.detach().clone()
    out = attention(x)
    assert torch.equal(x.detach(), copy)
    assert torch.autograd.gradcheck(attention, (x,), eps=1e-6, atol=1e-6)
    batch, channels = x.shape[:2]
    qkv = attention.qkv(attention.norm(x)).reshape(batch, 3, channels, -1)
    q, k, v = qkv.unbind(dim=1)
    weights = torch.softmax(q.transpose(1, 2) @ k / channels**0.5, dim=-1)
    h = (v @ weights.transpose(1, 2)).reshape_as(x)
    torch.testing.assert_close(out, (x + attention.proj_out(h)) / 2**0.5)
