"""Context beyond one slice: 2.5-D (neighbouring slices as image channels) and the 3-D networks and inferer.

- ``neighbour_slices`` / ``StackNeighbourSlicesd``: each slice's neighbours, the volume's border slices repeated,
  the label left as the centre slice, the metadata kept for ``Invertd``;
- the 3-D cDAL generator and discriminator (and the 3-D U-Net) shapes, and a clear refusal for 2-D-only methods;
- the 3-D evaluation path: a label volume pushed through the evaluation preprocessing and the 3-D sliding-window
  ensemble inferer scores Dice 1.0 (synthetic volume; a real one when ../shared/data is present);
- every slice-wise method with 2.5-D context, and cDAL and the U-Net in 3-D, through training, evaluation and
  inference for real on tiny data (the workflow-matrix runner).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, RandCropByPosNegLabeld
from torch import nn
from workflow_matrix import run_cell, write_tiny_data

from bundle.data.hippocampus import write_synthetic_hippocampus
from bundle.inferers.ensemble import EnsembleInferer
from bundle.inferers.samplers import DeterministicSampler
from bundle.metrics.binary import PerImageBinaryMetric
from bundle.networks.cdal import CDALDiscriminator, CDALGenerator
from bundle.transforms.volume import StackNeighbourSlicesd, VoteArgmaxd, neighbour_slices, prepare_slice_batch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HIPPO = [str(CONFIGS / f) for f in ("train.yaml", "methods/cdal.yaml", "datasets/hippocampus.yaml")]


def _slice_index_volume(depth: int = 5) -> torch.Tensor:
    """(1, 2, 3, depth): every voxel of slice z holds z."""
    return torch.arange(depth, dtype=torch.float32).expand(1, 2, 3, depth).clone()


def test_neighbour_slices_repeat_the_border_slices():
    volume = _slice_index_volume(5)
    stacked = neighbour_slices(volume, context=1, axis=2)
    assert stacked.shape == (3, 2, 3, 5)
    # channel block j at slice z holds slice clamp(z + j - 1): the centre block is the volume itself
    assert stacked[:, 0, 0].T.tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]]
    wide = neighbour_slices(volume, context=2, axis=2)
    assert wide[:, 0, 0, 0].tolist() == [0, 0, 0, 1, 2] and wide[:, 0, 0, 4].tolist() == [2, 3, 4, 4, 4]
    assert torch.equal(neighbour_slices(volume, context=0), volume)
    # another slice axis, and several image channels (channel blocks stay neighbour-major)
    along_h = neighbour_slices(torch.arange(4.0).reshape(1, 4, 1, 1), context=1, axis=0)
    assert along_h[:, :, 0, 0].tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 3]]
    two = neighbour_slices(torch.stack([volume[0], 10 + volume[0]]), context=1, axis=2)
    assert two.shape == (6, 2, 3, 5) and two[:, 0, 0, 0].tolist() == [0, 10, 0, 10, 1, 11]
    with pytest.raises(ValueError, match="context"):
        neighbour_slices(volume, context=-1)
    with pytest.raises(ValueError, match="slice axis"):
        neighbour_slices(volume, context=1, axis=3)


def test_stacked_training_crops_keep_the_centre_label_and_true_neighbours():
    """Stacking before the crop: a crop's slices carry the neighbours of the whole volume, and at the volume's
    ends the repeated border slice; the label of every training slice is the centre slice's."""
    depth = 12
    z = torch.arange(depth, dtype=torch.float32)
    image = (z + 1).expand(1, 8, 8, depth).clone()
    label = torch.zeros(1, 8, 8, depth)
    label[0, 2:6, 2:6, :] = (z % 3).expand(4, 4, depth)  # the label varies with z, so a shifted label is caught
    transforms = Compose(
        [
            StackNeighbourSlicesd(keys="image", context=1, axis=2),
            RandCropByPosNegLabeld(
                keys=["image", "label"], label_key="label", spatial_size=(8, 8, 5), pos=1, neg=1, num_samples=6
            ),
        ]
    )
    transforms.set_random_state(seed=0)
    crops = transforms({"image": image, "label": label})
    seen_border = set()
    for crop in crops:
        batch = {"image": crop["image"][None], "label": crop["label"][None]}
        slices, labels = prepare_slice_batch(batch)
        assert slices.shape == (5, 3, 8, 8) and labels.shape == (5, 1, 8, 8)
        for s in range(5):
            centre = int(slices[s, 1, 0, 0]) - 1  # the slice's own index in the volume
            assert int(slices[s, 0, 0, 0]) - 1 == max(centre - 1, 0)
            assert int(slices[s, 2, 0, 0]) - 1 == min(centre + 1, depth - 1)
            assert torch.equal(labels[s, 0, 2:6, 2:6], torch.full((4, 4), float(centre % 3)))
            if centre in (0, depth - 1):
                seen_border.add(centre)
    assert seen_border, "no crop reached the volume's ends; the border case was not exercised"


def test_hippocampus_overlay_stacks_context_for_every_workflow(tmp_path):
    msd = write_synthetic_hippocampus(tmp_path / "Task04_Hippocampus", num_cases=4, shape=(20, 24, 18), seed=1)
    parser = ConfigParser()
    parser.read_config(HIPPO)
    parser["context_slices"] = 2
    assert parser.get_parsed_content("image_channels") == 5
    assert parser.get_parsed_content("network_def#image_channels") == 5
    item = {"image": str(msd / "imagesTr" / "hippocampus_001.nii.gz")}
    item["label"] = item["image"].replace("imagesTr", "labelsTr")
    out = parser.get_parsed_content("validate#preprocessing")(item)
    image, label = out["image"], out["label"]
    assert image.shape[0] == 5 and label.shape[0] == 3  # five slices in, the one-hot label of the centre
    assert torch.equal(image[2], image[2]) and torch.equal(image[1][..., 1:], image[2][..., :-1])
    assert torch.equal(image[0][..., 0], image[2][..., 0]) and torch.equal(image[4][..., -1], image[2][..., -1])
    # the reorientation is still recorded, so Invertd maps predictions back to the input's grid
    assert [op["class"] for op in image.applied_operations] == [op["class"] for op in label.applied_operations]
    infer = ConfigParser()
    infer.read_config([str(CONFIGS / f) for f in ("inference.yaml", "methods/cdal.yaml", "datasets/hippocampus.yaml")])
    infer["context_slices"] = 1
    served = infer.get_parsed_content("preprocessing")({"image": item["image"]})
    assert served["image"].shape[0] == 3


def test_3d_cdal_networks_and_2d_only_refusals():
    torch.manual_seed(0)
    sizes = dict(label_channels=3, image_channels=1, num_channels=8, channel_mult=(1, 2), num_res_blocks=1)
    sizes.update(attention_resolutions=(8,), image_size=16, cond_enc_layers=1, nz=4, z_emb_dim=8)
    gen = CDALGenerator(**sizes, spatial_dims=3)
    x_t, image = torch.randn(2, 3, 16, 16, 8), torch.randn(2, 1, 16, 16, 8)
    out = gen(x_t, torch.tensor([0, 1]), torch.randn(2, 4), image=image)
    assert out.shape == (2, 3, 16, 16, 8) and out.abs().max() < 1
    assert any(isinstance(m, nn.Conv3d) for m in gen.modules()) and not any(
        isinstance(m, nn.Conv2d) for m in gen.modules()
    )
    with pytest.raises(ValueError, match=r"x_t must be \(B, 3, H, W, D\)"):
        gen(
            torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), torch.randn(2, 4), image_features=torch.zeros(2, 8, 16, 16)
        )
    disc = CDALDiscriminator(label_channels=3, ngf=4, channel_mult=(2, 4, 4), spatial_dims=3)
    features = disc.get_features(x_t, torch.tensor([0, 1]), x_t)
    assert [tuple(f.shape) for f in features] == [
        (2, 8, 16, 16, 8),
        (2, 8, 8, 8, 4),
        (2, 16, 4, 4, 2),
        (2, 16, 2, 2, 1),
    ]
    assert disc(x_t, torch.tensor([0, 1]), x_t).shape == (2, 1)
    # the 2-D network is unchanged: the same parameter names as before the 3-D option
    flat = CDALGenerator(**sizes)
    assert set(flat.state_dict()) == set(gen.state_dict())
    from bundle.networks.segdiff import SegDiffNetwork

    with pytest.raises(ValueError, match="SegDiff is a 2-D network.*cdal and unet"):
        SegDiffNetwork(spatial_dims=3)


class _Echo(nn.Module):
    """A 'network' whose logits are the (one-hot, {-1, 1}) label it is given: the ground truth as prediction."""

    label_channels = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * x


def _3d_round_trip_dice(image: str, label: str) -> float:
    parser = ConfigParser()
    parser.read_config(HIPPO)
    parser["spatial_dims"] = 3
    assert parser.get_parsed_content("roi_size") == [32, 32, 32] and parser.get_parsed_content("slice_axis") is None
    item = parser.get_parsed_content("validate#preprocessing")({"image": image, "label": label})
    inferer = EnsembleInferer(
        DeterministicSampler(activation="sigmoid"),
        num_generations=1,
        outputs="mean",
        roi_size=parser.get_parsed_content("roi_size"),
        overlap=parser.get_parsed_content("window_overlap"),
        sw_batch_size=parser.get_parsed_content("window_batch_size"),
        slice_axis=parser.get_parsed_content("slice_axis"),
    )
    onehot = item["label"][None]
    mean = inferer(onehot, _Echo())
    assert mean.shape == onehot.shape
    voted = VoteArgmaxd(keys="pred")({"pred": mean[0], "label": item["label"]})
    metric = PerImageBinaryMetric("dice")
    metric(voted["pred"][None], voted["label"][None])
    return float(metric.aggregate())


def test_3d_inferer_round_trip_scores_one(tmp_path):
    msd = write_synthetic_hippocampus(tmp_path / "Task04_Hippocampus", num_cases=2, shape=(35, 50, 36), seed=2)
    image = str(msd / "imagesTr" / "hippocampus_001.nii.gz")
    assert _3d_round_trip_dice(image, image.replace("imagesTr", "labelsTr")) == 1.0


@pytest.mark.realdata
def test_3d_inferer_round_trip_on_a_real_volume(shared_data_dir):
    root = shared_data_dir / "hippocampus" / "Task04_Hippocampus"
    image = str(root / "imagesTr" / "hippocampus_003.nii.gz")
    assert _3d_round_trip_dice(image, image.replace("imagesTr", "labelsTr")) == 1.0


VARIANT_CELLS = [(m, {"context_slices": 1}) for m in ("cdal", "segdiff", "unet", "prob_unet", "mose")] + [
    ("cdal", {"spatial_dims": 3, "network_def#attention_resolutions": []}),
    ("unet", {"spatial_dims": 3}),
]


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    data = write_tiny_data(root / "data")["hippocampus"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.disable(logging.INFO)
    results = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for method, extra in VARIANT_CELLS:
                name = f"{method}_{'3d' if extra.get('spatial_dims') == 3 else '2.5d'}"
                three_d = extra.get("spatial_dims") == 3  # 2.5-D evaluates as 2-D: its new parts are in train/serve
                for workflow in ("training", "evaluating", "inference") if three_d else ("training", "inference"):
                    run_cell(workflow, method, "hippocampus", root / name, data, extra=extra)
                results[name] = root / name
    finally:
        torch.set_num_threads(threads)
        logging.disable(logging.NOTSET)
    return results


@pytest.mark.matrix
def test_every_variant_trains_evaluates_and_serves(variant_runs):
    import nibabel as nib

    assert sorted(variant_runs) == sorted(
        ["cdal_2.5d", "segdiff_2.5d", "unet_2.5d", "prob_unet_2.5d", "mose_2.5d", "cdal_3d", "unet_3d"]
    )
    for name, root in variant_runs.items():
        assert (root / "models" / "model.pt").is_file(), name
        if name.endswith("_3d"):
            assert (root / "eval" / "evaluation_hippocampus_test" / "metrics_summary.json").is_file(), name
        masks = sorted((root / "inference" / "masks").glob("*.nii.gz"))
        assert [m.name for m in masks] == ["hippocampus_001.nii.gz", "hippocampus_002.nii.gz"], name
        for mask in masks:
            source = nib.load(root.parent / "data" / "hippocampus_inputs" / mask.name)
            written = nib.load(mask)
            assert written.shape == source.shape and np.allclose(written.affine, source.affine), name
            assert set(np.unique(np.asarray(written.dataobj)).tolist()) <= {0, 1, 2}, name
            assert (root / "inference" / "uncertainty" / mask.name).is_file(), name


class _DivisibleEcho(_Echo):
    """The echo network, refusing sides that are not a multiple of 4 (as the generators do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"sides must be multiples of 4, got {tuple(x.shape[2:])}")
        return super().forward(x)


def test_whole_slices_pad_each_slice_to_the_network_multiple_and_crop_back():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 1, 35, 51, 9))
    onehot = torch.cat([(labels == c).float() * 2 - 1 for c in range(3)], dim=1)
    calls = []
    network = _DivisibleEcho()
    network.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    whole = EnsembleInferer(
        DeterministicSampler(activation="sigmoid"), num_generations=1, outputs="mean", roi_size=(32, 32),
        overlap=0.75, sw_batch_size=4, slice_axis=2, whole_slices=True,
    )(onehot, network)  # fmt: skip
    assert whole.shape == onehot.shape
    torch.testing.assert_close(whole, torch.sigmoid(20.0 * onehot))  # every voxel its own, padding cropped away
    assert {c[2:] for c in calls} == {(36, 52)} and sum(c[0] for c in calls) == 2 * 9  # one window per slice
    with pytest.raises(ValueError, match="multiples of 4"):  # the windows of the paper protocol need no padding,
        EnsembleInferer(  # but whole slices without it would reach the network at 35 x 51
            DeterministicSampler(activation="sigmoid"), num_generations=1, outputs="mean", slice_axis=2,
        )(onehot, network)  # fmt: skip


@pytest.mark.parametrize("method", ["unet", "prob_unet", "mose"])
def test_whole_slices_pad_to_what_each_network_needs(method):
    """The U-Net-shaped baselines have three down-samplings (sides a multiple of 8, not the generators' 4): whole
    slices of a 35 x 51 volume reach them at 40 x 56 and come back at 35 x 51."""
    from bundle.inferers.ensemble import network_size_divisor
    from bundle.inferers.samplers import LatentSampler
    from bundle.networks.mose import MixtureOfStochasticExperts
    from bundle.networks.prob_unet import ProbabilisticUNet
    from bundle.networks.unet_baseline import BaselineUNet

    torch.manual_seed(0)
    network, sampler = {
        "unet": (BaselineUNet(1, 3, channels=(4, 8, 8, 8), strides=(2, 2, 2), num_res_units=1), DeterministicSampler()),
        "prob_unet": (ProbabilisticUNet(1, 3, num_channels=(4, 8, 8, 8), latent_dim=2), LatentSampler()),
        "mose": (MixtureOfStochasticExperts(1, 3, num_channels=(4, 8, 8, 8), num_experts=2, latent_dim=2), LatentSampler()),
    }[method]  # fmt: skip
    assert network_size_divisor(network) == 8
    calls = []
    network.register_forward_pre_hook(lambda m, i: calls.append(tuple(i[0].shape[2:])))
    volume = torch.rand(1, 1, 35, 51, 3)
    out = EnsembleInferer(
        sampler, num_generations=2, outputs="mean", roi_size=(32, 32), slice_axis=2, whole_slices=True
    )(volume, network.eval())
    assert out.shape == (1, 3, 35, 51, 3)  # at 36 x 52 (the generators' multiple) these networks refuse the input
    if method == "unet":  # the latent models are called through their samplers, not forward()
        assert set(calls) == {(40, 56)}
