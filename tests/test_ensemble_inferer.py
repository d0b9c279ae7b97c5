"""The one ensemble inferer (bundle.inferers.ensemble.EnsembleInferer) with the real cDAL generator (small
profile); the same rules for the sampling and deterministic networks are in test_method_samplers.py."""

import pytest
import torch
from monai.inferers import SlidingWindowInferer

from bundle.diffusion.cdal_schedule import make_cdal_scheduler
from bundle.diffusion.diffusion_sampler import DiffusionSampler
from bundle.inferers.ensemble import EnsembleInferer
from bundle.networks.cdal import CDALGenerator


def _generator(seed=0):
    torch.manual_seed(seed)
    net = CDALGenerator(
        label_channels=1,
        num_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        image_size=16,
        cond_enc_layers=1,
        nz=8,
        z_emb_dim=16,
    ).eval()
    # the head is zero-initialised (output 0 everywhere): give it weights so samples depend on the noise
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.05)
    return net


def _generators(rows, seed=100):
    return [torch.Generator().manual_seed(seed + r) for r in range(rows)]


def _inferer(**kw):
    kw.setdefault("outputs", "mean")
    return EnsembleInferer(DiffusionSampler(make_cdal_scheduler(4)), **kw)


def test_batched_generations_equal_sequential_generations():
    net, images = _generator(), torch.randn(2, 3, 16, 16)
    inferer = _inferer(num_generations=3, outputs=("mean", "uncertainty", "samples"))
    batched = inferer.ensemble(images, net, _generators(6))
    one_by_one = _inferer(num_generations=3, outputs="samples", generation_batch_size=1).ensemble(
        images, net, _generators(6)
    )
    torch.testing.assert_close(batched["samples"], one_by_one, atol=1e-5, rtol=1e-5)
    # the samples really differ between generations, so the equality above is not trivial
    s = batched["samples"]
    assert (s[:, 0] - s[:, 1]).abs().max() > 1e-3
    # and each image's ensemble equals running that image alone with its generators
    single = inferer.ensemble(images[1:], net, _generators(6)[3:])
    torch.testing.assert_close(batched["mean"][1:], single["mean"], atol=1e-5, rtol=1e-5)


def test_image_encoder_runs_once_per_image():
    net, images = _generator(), torch.randn(2, 3, 16, 16)
    calls = []
    net.encode_image = (lambda f: lambda x: calls.append(x.shape[0]) or f(x))(net.encode_image)
    _inferer(num_generations=5).ensemble(images, net, _generators(10))
    assert calls == [2]  # one call for the batch of 2 images, not per step or per generation


def test_outputs_mean_and_uncertainty_are_consistent():
    net, images = _generator(), torch.randn(1, 3, 16, 16)
    out = _inferer(num_generations=4, outputs=("mean", "uncertainty", "samples")).ensemble(images, net, _generators(4))
    probs = out["samples"].reshape(1, 4, 1, 16, 16)
    assert out["mean"].shape == (1, 1, 16, 16) and out["uncertainty"].shape == (1, 1, 16, 16)
    assert float(out["mean"].min()) >= 0 and float(out["mean"].max()) <= 1
    torch.testing.assert_close(out["mean"], probs.mean(1))
    torch.testing.assert_close(out["uncertainty"], probs.std(1, unbiased=False))
    assert float(out["uncertainty"].max()) > 0


def test_sliding_window_tiles_match_per_tile_ensembles():
    """With roi_size, a 32x32 image is four 16x16 tiles, each an independent ensemble; stitching is exact."""
    net, image = _generator(), torch.randn(1, 3, 32, 32)
    tiled = _inferer(num_generations=2, roi_size=(16, 16), sw_batch_size=4, seed=7)
    out = tiled(image, net)
    assert out.shape == (1, 1, 32, 32)
    # reproduce: the same seeded stream, the four tiles as one batch in SlidingWindowInferer's order
    ref = _inferer(num_generations=2, seed=7)
    tiles = torch.cat([image[..., r : r + 16, c : c + 16] for r in (0, 16) for c in (0, 16)])
    per_tile = ref(tiles, net)
    stitched = torch.zeros(1, 1, 32, 32)
    for k, (r, c) in enumerate([(0, 0), (0, 16), (16, 0), (16, 16)]):
        stitched[..., r : r + 16, c : c + 16] = per_tile[k]
    torch.testing.assert_close(out, stitched, atol=1e-5, rtol=1e-5)
    # it is also usable the other way round, wrapped by a plain SlidingWindowInferer
    outer = SlidingWindowInferer(roi_size=(16, 16), sw_batch_size=4, overlap=0.0)
    assert outer(image, lambda x: _inferer(num_generations=2)(x, net)).shape == (1, 1, 32, 32)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_generations"):
        _inferer(num_generations=0)
    with pytest.raises(ValueError, match="outputs"):
        _inferer(outputs=("median",))
    with pytest.raises(ValueError, match="generators"):
        _inferer(num_generations=2).ensemble(torch.randn(1, 3, 16, 16), _generator(), _generators(3))


def test_seeded_noise_follows_the_image_not_the_batch():
    """With a seed, an image's generations depend on its file name only: alone, batched or reordered, the same."""
    from monai.data import MetaTensor

    net = _generator()
    a, b = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16)

    def named(x, names):
        return MetaTensor(x, meta={"filename_or_obj": names})

    inferer = _inferer(num_generations=2, seed=3, outputs="samples")
    alone = inferer(named(a, ["a.tif"]), net)
    again = _inferer(num_generations=2, seed=3, outputs="samples")(named(a, ["a.tif"]), net)
    other_name = inferer(named(a, ["c.tif"]), net)
    torch.testing.assert_close(alone, again)
    assert (alone - other_name).abs().max() > 1e-3  # a different image name gives different noise
    # after other calls, the same image still gets the same noise (no dependence on call order)
    inferer(named(b, ["b.tif"]), net)
    torch.testing.assert_close(inferer(named(a, ["a.tif"]), net), alone)


def test_bf16_autocast_runs_the_network_in_bf16_and_keeps_the_sampler_in_fp32():
    net, images = _generator(), torch.randn(2, 3, 16, 16)
    conv_dtypes, head_dtypes = set(), []
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, o: conv_dtypes.add(o.dtype))
    net.register_forward_hook(lambda m, i, o: head_dtypes.append((i[0].dtype, o.dtype)))
    full = _inferer(num_generations=3, outputs=("mean", "samples")).ensemble(images, net, _generators(6))
    assert conv_dtypes == {torch.float32}
    conv_dtypes.clear(), head_dtypes.clear()
    half = _inferer(num_generations=3, outputs=("mean", "samples"), autocast="bfloat16").ensemble(
        images, net, _generators(6)
    )
    assert conv_dtypes == {torch.bfloat16}
    # the sampler hands the network fp32 states at every step (the network's bf16 output is cast back)
    assert head_dtypes and all(x == torch.float32 for x, _ in head_dtypes)
    assert half["mean"].dtype == torch.float32
    # same noise, reduced precision: close to the fp32 ensemble, not equal to it
    diff = (half["samples"] - full["samples"]).abs()
    assert 0 < diff.max() < 0.05
    assert diff.mean() < 0.01


def test_autocast_argument_is_validated():
    assert _inferer(autocast=True).autocast == torch.bfloat16
    assert _inferer(autocast="fp16").autocast == torch.float16
    assert _inferer(autocast=False).autocast is None
    with pytest.raises(ValueError, match="autocast"):
        _inferer(autocast="int8")


def test_channels_last_inputs_give_the_same_ensemble_and_reach_the_network_as_nhwc():
    net, images = _generator(), torch.randn(2, 3, 16, 16)
    layouts = []
    net.register_forward_hook(
        lambda m, i, kw, o: layouts.append(kw["image_features"].is_contiguous(memory_format=torch.channels_last)),
        with_kwargs=True,
    )
    plain = _inferer(num_generations=3, outputs=("mean", "samples")).ensemble(images, net, _generators(6))
    assert layouts and not any(layouts)
    layouts.clear()
    nhwc = _inferer(num_generations=3, outputs=("mean", "samples"), channels_last=True).ensemble(
        images, net, _generators(6)
    )
    assert layouts and all(layouts)  # every step's inputs reached the network in NHWC
    torch.testing.assert_close(nhwc["samples"], plain["samples"], atol=1e-4, rtol=1e-4)
    assert nhwc["mean"].dtype == torch.float32
    with pytest.raises(ValueError, match="channels_last"):
        _inferer(channels_last="sideways")


@pytest.mark.parametrize("amx, avx512_bf16", [(True, False), (False, True), (False, False)])
def test_amp_auto_with_the_cpu_detection_forced(monkeypatch, amx, avx512_bf16):
    """Whatever this machine has: with AMX or AVX-512 BF16 reported, ``auto`` runs the network in bf16 (the same
    numbers as forcing bf16) and names it so; with neither, fp32 (the same numbers as no autocast)."""
    from bundle.inferers.autocast import native_bf16, precision_name, resolve_autocast

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    cpu, native = torch.device("cpu"), amx or avx512_bf16
    assert native_bf16(cpu) is native
    assert resolve_autocast("auto", cpu) == (torch.bfloat16 if native else None)
    assert precision_name("auto", cpu) == ("bfloat16" if native else "float32")
    net, images = _generator(), torch.randn(2, 3, 16, 16)
    auto = _inferer(num_generations=2, outputs="samples", autocast="auto")
    assert auto.network_dtype(cpu) == (torch.bfloat16 if native else None)
    forced = _inferer(num_generations=2, outputs="samples", autocast=torch.bfloat16 if native else None)
    got = auto.ensemble(images, net, _generators(4))
    torch.testing.assert_close(got, forced.ensemble(images, net, _generators(4)), rtol=0, atol=0)
    assert got.dtype == torch.float32  # the sampler's arithmetic stays fp32 either way
    if native:  # and bf16 really ran: the output differs from fp32's
        fp32 = _inferer(num_generations=2, outputs="samples", autocast=None).ensemble(images, net, _generators(4))
        assert (got - fp32).abs().max() > 1e-4


@pytest.mark.parametrize("available, bf16", [(True, True), (True, False), (False, False)])
def test_amp_auto_with_the_cuda_detection_forced(monkeypatch, available, bf16):
    from bundle.inferers.autocast import native_bf16, resolve_autocast

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    cuda = torch.device("cuda")
    assert native_bf16(cuda) is (available and bf16)
    assert resolve_autocast("auto", cuda) == (torch.bfloat16 if available and bf16 else None)


def test_amp_auto_follows_the_devices_native_bf16_and_is_recorded_by_name():
    from bundle.inferers.autocast import native_bf16, precision_name, resolve_autocast

    cpu = torch.device("cpu")
    native = bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    assert native_bf16(cpu) is native
    assert resolve_autocast("auto", cpu) == (torch.bfloat16 if native else None)
    assert precision_name("auto", cpu) == ("bfloat16" if native else "float32")
    assert precision_name(False, cpu) == "float32" and precision_name("fp16", cpu) == "float16"
    assert resolve_autocast(True, cpu) == torch.bfloat16  # true forces bf16 whatever the hardware
    net, images = _generator(), torch.randn(2, 3, 16, 16)
    auto = _inferer(num_generations=2, outputs="samples", autocast="auto")
    assert auto.autocast == "auto" and auto.network_dtype(cpu) == resolve_autocast("auto", cpu)
    forced = _inferer(num_generations=2, outputs="samples", autocast=torch.bfloat16 if native else None)
    torch.testing.assert_close(auto.ensemble(images, net, _generators(4)), forced.ensemble(images, net, _generators(4)))
