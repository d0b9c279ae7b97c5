"""SegDiff: the denoising step, the EMA handler, and the method overlay composed with train/evaluate/inference."""

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from bundle.diffusion.diffusion_sampler import DiffusionSampler
from bundle.diffusion.segdiff_schedule import make_segdiff_scheduler
from bundle.engines.steps.denoising import DenoisingStep, denoising_loss
from bundle.engines.trainer import SegmentationTrainer
from bundle.handlers.ema import ExponentialMovingAverage, averaged_copy
from bundle.networks.segdiff import SegDiffNetwork
from bundle.runtime import prepare_network, unwrap_network

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks run fastest on one thread


def _tiny():
    torch.manual_seed(0)
    return SegDiffNetwork(
        num_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        image_size=16,
        rrdb_blocks=1,
        rrdb_features=8,
        rrdb_growth=4,
    )


def test_eps_loss_is_the_per_sample_sum_averaged_over_the_batch():
    eps = torch.zeros(2, 1, 4, 4)
    eps_hat = torch.ones(2, 1, 4, 4)
    eps_hat[1] *= 2  # per-sample sums 16 and 64
    assert denoising_loss(eps, eps_hat).item() == pytest.approx(40.0)
    assert denoising_loss(eps, eps_hat, reduction="mean").item() == pytest.approx(2.5)


def _trainer(net, data, optimizer, ema=None):
    return SegmentationTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=data,
        step=DenoisingStep(make_segdiff_scheduler(100)),
        networks={"network": net},
        optimizers={"network": optimizer},
        train_handlers=[ema] if ema else None,
    )


def test_ema_update_formula_and_checks():
    net = _tiny()
    ema_net = averaged_copy(net)
    ema = ExponentialMovingAverage(net, ema_net, decay=0.9)
    before = [p.detach().clone() for p in ema_net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update()
    for old, new, trained in zip(before, ema_net.parameters(), net.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * trained)
    assert ema.num_updates == 1 and not any(p.requires_grad for p in ema_net.parameters())
    with pytest.raises(ValueError, match="shares parameters"):
        ExponentialMovingAverage(net, net)
    with pytest.raises(ValueError, match="decay"):
        ExponentialMovingAverage(net, averaged_copy(net), decay=1.5)


def test_ema_of_a_ddp_channels_last_network_starts_equal_and_stays_plain(tmp_path):
    """The trained network as prepare_network leaves it under torchrun (DDP, here one gloo rank, NHWC weights): the
    EMA reads the module inside, takes its weights when built (the ranks' EMAs then start from rank 0's) and
    averages towards them; the EMA network itself stays a plain module."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ema_net = _tiny()
        with torch.no_grad():
            for p in ema_net.parameters():
                p.add_(1.0)  # this rank built a different network
        torch.manual_seed(1)
        trained = prepare_network(_tiny(), "cpu", channels_last=True, distributed=True)
        assert isinstance(trained, torch.nn.parallel.DistributedDataParallel)
        ema = ExponentialMovingAverage(trained, ema_net, decay=0.5)
        module = unwrap_network(trained)
        assert ema.module is module and ema.ema_network is ema_net
        for a, b in zip(ema_net.parameters(), module.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        data = [{"image": torch.randn(2, 3, 16, 16), "label": torch.randint(0, 2, (2, 1, 16, 16)).float() * 2 - 1}]
        before = [p.detach().clone() for p in ema_net.parameters()]
        _trainer(trained, data, torch.optim.AdamW(trained.parameters(), lr=1e-3), ema).run()
        assert ema.num_updates == 1
        for old, new, p in zip(before, ema_net.parameters(), module.parameters()):
            torch.testing.assert_close(new, 0.5 * old + 0.5 * p)
        assert not any(k.startswith("module.") for k in ema_net.state_dict())
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_trainer_steps_the_optimiser_and_the_ema(decay):
    net = _tiny()
    ema_net = averaged_copy(net)
    initial = [p.detach().clone() for p in net.parameters()]
    data = [{"image": torch.randn(2, 3, 16, 16), "label": torch.randint(0, 2, (2, 1, 16, 16)).float() * 2 - 1}] * 2
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ema = ExponentialMovingAverage(net, ema_net, decay=decay)
    trainer = _trainer(net, data, optimizer, ema)
    trainer.run()
    assert trainer.state.iteration == 2 and ema.num_updates == 2
    assert trainer.state.output["loss"].item() > 0
    moved = [not torch.equal(a, b) for a, b in zip(initial, net.parameters())]
    assert sum(moved) > len(moved) // 2  # the optimiser changed the trained weights
    reference = initial if decay == 1.0 else list(net.parameters())  # decay 1: EMA frozen; 0: EMA = latest
    for a, b in zip(ema_net.parameters(), reference):
        torch.testing.assert_close(a, b)


def _parse(files, **overrides):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_overlay_composes_with_train_evaluate_and_inference(tmp_path):
    train = _parse(["train.yaml", "evaluate.yaml", "methods/segdiff.yaml"], bundle_root=str(tmp_path))
    assert isinstance(train.get_parsed_content("training_step"), DenoisingStep)
    assert train["train#checkpointer#model"] == "@network"  # model.pt holds the EMA weights
    network, trained = train.get_parsed_content("network"), train.get_parsed_content("train_network")
    ema = train.get_parsed_content("ema")
    assert ema.ema_network is network and ema.network is trained and network is not trained
    assert unwrap_network(trained) is trained  # single process, no fast paths: a plain module
    sampler = train.get_parsed_content("sampler")
    assert isinstance(sampler, DiffusionSampler) and len(sampler.timesteps) == 10 and sampler.step.eta == 1.0
    assert train.get_parsed_content("validate#inferer").num_generations == train["num_generations"]
    names = train.get_parsed_content("evaluate#handlers_by_name#report").metric_names
    assert {"wcov", "boundary_f", "calibration"} <= set(names)
    torch.save(network.state_dict(), tmp_path / "model.pt")

    inference = _parse(["inference.yaml", "methods/segdiff.yaml"], bundle_root=str(tmp_path))
    inference["sampling_method"] = "ddpm"
    served = inference.get_parsed_content("network")
    served.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert isinstance(served, SegDiffNetwork)
    inferer = inference.get_parsed_content("inferer")
    assert inferer.sampler.timesteps == list(range(99, -1, -1)) and inferer.sampler.step.eta is None
    assert inferer.num_generations == inference["num_generations"]


def test_paper_overlay_sets_the_reference_protocol():
    paper = _parse(["train.yaml", "methods/segdiff.yaml", "paper/segdiff_monuseg.yaml"])
    assert paper["network_def#num_channels"] == 128 and paper["network_def#rrdb_blocks"] == 12
    assert paper["num_generations"] == 9 and paper["ema_decay"] == 0.9999
    sampler = paper.get_parsed_content("sampler")
    assert len(sampler.timesteps) == 100 and not sampler.step.clip_x0 and sampler.step.eta is None
    _, _, _, ancestral = sampler.step.coefficients(99, 98)
    assert float(ancestral) == pytest.approx(0.2)  # fixed-large: sigma^2 = beta_T


def test_single_process_training_saves_plain_state_dicts_and_resumes(tmp_path):
    """train.yaml + segdiff.yaml in one process: the EMA network is validated and saved as model.pt, last.pt holds
    both networks and the EMA count, and a resumed run continues them."""
    small = {
        "bundle_root": str(tmp_path),
        "dataset_dir": str(tmp_path / "data"),
        "val_fraction": 0.25,
        "dataset_root": "$bundle.data.synthetic.ensure_synthetic_monuseg(@dataset_dir, num_train=8, num_test=1,"
        " size=128, seed=0)",
        "image_size": 64,
        "batch_size": 2,
        "epoch_length": 2,
        "max_epochs": 2,
        "val_interval": 2,
        "num_generations": 1,
        "sampling_steps": 2,
    }

    def run(**overrides):
        parser = _parse(["train.yaml", "methods/segdiff.yaml"], **{**small, **overrides})
        for name in (
            "train#handlers_by_name#mlflow",
            "train#handlers_by_name#stats",
            "train#handlers_by_name#progress",
            "validate#handlers_by_name#mlflow",
            "validate#handlers_by_name#panels",
        ):
            parser[f"{name}#_disabled_"] = True  # switched off by name: validation and checkpoints only
        parser.get_parsed_content("training")
        return parser

    first = run()
    last_path = tmp_path / "models" / "checkpoints" / "last.pt"
    last = torch.load(last_path, weights_only=True)
    assert last["trainer"]["iteration"] == 4 and last["ema"]["num_updates"] == 4
    assert last["checkpointer"]["best_epoch"] == 2
    model = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    for key, value in first.get_parsed_content("network").state_dict().items():
        torch.testing.assert_close(model[key], value, rtol=0, atol=0)  # model.pt: the validated EMA weights
        torch.testing.assert_close(last["ema_network"][key], value, rtol=0, atol=0)
    assert last["networks"]["network"].keys() == model.keys()

    resumed = run(resume=True, max_epochs=3)
    trained = resumed.get_parsed_content("train_network")
    assert resumed.get_parsed_content("ema").num_updates == 6
    after = torch.load(last_path, weights_only=True)
    assert after["trainer"]["iteration"] == 6 and after["ema"]["num_updates"] == 6
    assert all(s["step"] == 6 for s in after["optimizers"]["network"]["state"].values())  # optimiser restored
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(after["networks"]["network"][key], value, rtol=0, atol=0)
