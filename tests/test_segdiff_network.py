"""SegDiff eps-network: reference size, encoder caching, conditioning ablations, input checks."""

import pytest
import torch

from bundle.networks.rrdb import RRDBEncoder
from bundle.networks.segdiff import SegDiffNetwork

SMALL = dict(
    num_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    image_size=16,
    rrdb_blocks=1,
    rrdb_features=8,
    rrdb_growth=4,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks run fastest on one thread


def _small(conditioning="sum"):
    torch.manual_seed(0)
    net = SegDiffNetwork(conditioning=conditioning, **SMALL).eval()
    with torch.no_grad():
        net.unet.out[2].conv.weight.normal_(0, 0.05)  # zero-initialised output conv: make eps input-dependent
    return net


def test_defaults_are_the_reference_size():
    with torch.device("meta"):
        net = SegDiffNetwork()
        rrdb = RRDBEncoder(num_blocks=12)
    params = sum(p.numel() for p in net.parameters())
    assert params == pytest.approx(164.2e6, rel=2e-3)  # the reference eps-model: 164.2 M (METHODS.md section 7)
    assert sum(p.numel() for p in rrdb.parameters()) == sum(p.numel() for p in net.image_encoder.parameters())
    assert net.num_levels == 7 and net.unet.block_out_channels == [128, 128, 128, 256, 256, 512, 512]
    assert list(net.unet.attention_levels) == [False, False, False, False, True, True, False]  # 16x16 and 8x8


def test_cached_features_give_the_same_eps_and_broadcast():
    net = _small()
    x, image, t = torch.randn(3, 1, 16, 16), torch.randn(1, 3, 16, 16), torch.tensor([0, 7, 24])
    with torch.no_grad():
        direct = net(x, t, image=image.expand(3, -1, -1, -1))
        features = net.encode_image(image)
        cached = net(x, t, image_features=features)  # (1, C, H, W) features broadcast over the 3 rows
        single = torch.cat([net(x[i : i + 1], t[i : i + 1], image=image) for i in range(3)])
    assert features.shape == (1, 32, 16, 16) and direct.shape == (3, 1, 16, 16)
    torch.testing.assert_close(cached, direct, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single, direct, rtol=1e-4, atol=1e-5)  # per-sample: batching changes nothing
    assert (direct[0] - direct[1]).abs().max() > 1e-4  # eps depends on t and x_t


@pytest.mark.parametrize("conditioning,feature_channels", [("concat", 32), ("image_concat", 3)])
def test_ablation_variants(conditioning, feature_channels):
    net = _small(conditioning)
    image, x, t = torch.randn(2, 3, 16, 16), torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    features = net.encode_image(image)
    assert features.shape == (2, feature_channels, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, image_features=features), net(x, t, image=image))
    if conditioning == "image_concat":
        assert net.image_encoder is None and net.label_conv.in_channels == 4
        torch.testing.assert_close(features, image)
    else:
        assert isinstance(net.unet.conv_in, torch.nn.Conv2d) and net.unet.conv_in.in_channels == 64


def test_bad_inputs_are_named():
    net = _small()
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([3])
    with pytest.raises(ValueError, match="image must be"):
        net(x, t, image=torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="exactly one"):
        net(x, t)
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.randn(1, 1, 15, 15), t, image=torch.randn(1, 3, 15, 15))
    with pytest.raises(ValueError, match="same size as the label"):
        net(x, t, image_features=torch.randn(1, 32, 8, 8))
    with pytest.raises(ValueError, match="conditioning"):
        SegDiffNetwork(conditioning="product", **SMALL)
