#!/usr/bin/env python
"""Serving speed of one Hippocampus volume at the paper protocol: where the time goes, and the bound it has.

The shipped cDAL model (``configs/inference.yaml`` + ``configs/datasets/hippocampus.yaml``: generator nf 32, T = 4)
segments a real MSD volume with the paper's protocol (axial 32 x 32 windows with overlap 0.75, N = 5 generations)
through ``EnsembleInferer``, once per path, each path in a fresh process (so that its peak RSS is its own):

- ``baseline``: the path before the change, 64 windows (320 rows) per network batch, NCHW inputs, the cDAL
  blocks' arithmetic out of place (``bundle.networks.blocks.out_of_place_arithmetic``);
- ``default``: what ``configs/inference.yaml`` serves now (``window_batch_size`` from the overlay's
  ``slice_batch_size``, channels-last inputs: ``inference_channels_last``);
- ``whole_slices``: the fast protocol (``--whole_slices true``): each slice whole, padded to the inferer's multiple, no
  overlapping windows (its Dice against the paper protocol: ``--dice``).

Beside the times it reports the FLOPs the protocol performs (the encoder once per window, the generator once per
row and step; counted with ``FlopCounterMode`` on a meta-device copy, no arithmetic), the generator's best
achieved FLOP/s over batch sizes (the same layer shapes, channels-last, measured here), the lower bound that gives
(FLOPs / that rate) and each path's distance to it, the largest difference between the two paths' ensemble means
(the same noise: it must be ~1e-5) and the peak RSS (``--repeats K``: each path K times, interleaved, medians and
ranges: the machine's speed drifts); where one generator call's time goes by kind of operator
(torch profiler) and the stricter bound of the FLOP-counted operators alone. Then one MoNuSeg tile (``--tile``) at
its paper protocol (resized to 512 x 512, four 256 x 256 windows, N, T = 4) with the paper-size cDAL network
(``--tile_network paper``; ``cpu``: the bundle's default network; ``none``: skipped), fp32 forced and ``amp: auto``,
each in a fresh process: what ``auto`` gains where the hardware has native bf16 (and that it costs nothing where it
does not). JSON to ``--json``; a dated Markdown section with the machine is appended to docs/benchmarks.md unless
``--no_markdown``.

    OMP_NUM_THREADS=1 python tools/benchmark_serving.py            # ~11 minutes on one core (the tile: 7)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from monai.bundle import ConfigParser
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from benchmark import machine_description, measure_matmul_peak  # noqa: E402

from bundle import composer  # noqa: E402
from bundle.inferers.ensemble import network_size_divisor  # noqa: E402
from bundle.networks.blocks import out_of_place_arithmetic  # noqa: E402

DEFAULT_VOLUME = REPO.parent / "shared" / "data" / "hippocampus" / "Task04_Hippocampus" / "imagesTr"
CONFIGS = composer.config_files("inference", dataset="hippocampus")
BASELINE_WINDOWS = 64  # windows per batch before the change (configs/datasets/hippocampus.yaml slice_batch_size)
PATHS = ("baseline", "default", "whole_slices")
DEFAULT_TILE = REPO.parent / "shared" / "data" / "monuseg" / "MoNuSegTrainingData" / "Tissue_Images"
TILE_CONFIGS = {  # the network serving the tile: the paper-size cDAL (41.7 M parameters) or the bundle's default
    "paper": composer.config_files("inference", "cdal", "monuseg", paper=True),
    "cpu": composer.config_files("inference", dataset="monuseg"),
}
TILE_PRECISIONS = ("false", "auto")  # fp32 forced, and the default (bf16 network calls only where native)


def parse(bundle_root: str, volume: Path, num_generations: int) -> ConfigParser:
    overrides = {"bundle_root": bundle_root, "num_generations": num_generations}
    return composer.compose(CONFIGS, {**overrides, "input_datalist": [{"image": str(volume)}]})


def load(parser: ConfigParser) -> tuple[torch.nn.Module, torch.Tensor]:
    """The served network with its weights, and the preprocessed volume (1, C, H, W, D)."""
    network = parser.get_parsed_content("network_def").eval()
    network.load_state_dict(torch.load(parser.get_parsed_content("checkpoint"), map_location="cpu", weights_only=True))
    item = parser.get_parsed_content("dataset")[0]
    return network, item["image"][None]


def _peak_rss_mib() -> float:
    """This process's peak resident set size. ``VmHWM`` belongs to the address space that ``exec`` starts anew;
    ``getrusage``'s ``ru_maxrss`` survives ``exec`` on Linux, so a spawned child would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_path(name: str, volume: str, num_generations: int, threads: int, queue) -> None:
    """One path in this (fresh) process: seconds, ensemble mean, peak RSS."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as root:
        parser = parse(root, Path(volume), num_generations)
        network, image = load(parser)
        inferer = parser.get_parsed_content("inferer")
        if name == "baseline":
            inferer.sw_batch_size, inferer.channels_last = BASELINE_WINDOWS, False
        inferer.whole_slices = name == "whole_slices"
        arithmetic = out_of_place_arithmetic() if name == "baseline" else contextlib.nullcontext()
        start = time.perf_counter()
        with torch.no_grad(), arithmetic:
            out = inferer(image, network)
        seconds = time.perf_counter() - start
    queue.put(
        {
            "seconds": seconds,
            "windows_per_batch": inferer.sw_batch_size,
            "channels_last": inferer.channels_last,
            "mean": out["mean"].as_tensor().numpy(),
            "peak_rss_mib": _peak_rss_mib(),
        }
    )


def _window_count(plane: list[int], roi: list[int], overlap: float) -> int:
    """Sliding windows of ``roi`` over ``plane`` (padded up to the window) at ``overlap``, as MONAI places them."""
    plane = [max(s, r) for s, r in zip(plane, roi)]
    return len(dense_patch_slices(plane, roi, _get_scan_interval(plane, roi, len(roi), (overlap,) * len(roi))))


def _call_flops(meta: torch.nn.Module, image_channels: int, label_channels: int, shape: list[int]) -> tuple:
    """(FLOPs of the encoder on one ``shape`` window, FLOPs of one generator call on one row); ``meta`` is a
    meta-device copy of the network, so nothing is computed."""
    with FlopCounterMode(display=False) as counter:
        features = meta.encode_image(torch.empty(1, image_channels, *shape, device="meta"))
    encoder = float(counter.get_total_flops())
    x_t = torch.empty(1, label_channels, *shape, device="meta")
    t, z = torch.zeros(1, dtype=torch.long, device="meta"), torch.empty(1, meta.nz, device="meta")
    with FlopCounterMode(display=False) as counter:
        meta(x_t, t, z, image_features=features)
    return encoder, float(counter.get_total_flops())


def _generator_inputs(parser: ConfigParser, network: torch.nn.Module, image: torch.Tensor, rows: int) -> tuple:
    """Random channels-last inputs of one generator call on ``rows`` rows of the protocol's window:
    (x_t, t, z, image_features)."""
    roi = [int(s) for s in parser.get_parsed_content("roi_size")]
    channels = int(parser.get_parsed_content("label_channels"))
    window = torch.randn(rows, image.shape[1], *roi).contiguous(memory_format=torch.channels_last)
    x_t = torch.randn(rows, channels, *roi).contiguous(memory_format=torch.channels_last)
    return x_t, torch.ones(rows, dtype=torch.long), torch.randn(rows, network.nz), network.encode_image(window)


def run_tile(
    network: str, precision: str, tile: str, num_generations: int, threads: int, overrides: dict, queue
) -> None:
    """One MoNuSeg tile at the paper protocol in this (fresh) process: resized to 512 x 512, its four 256 x 256
    windows, N generations, T steps, through the served ``EnsembleInferer`` with ``amp`` = ``precision``. The
    network has its initial weights (no paper-size model is trained here): the arithmetic is the trained one's."""
    from bundle.inferers.autocast import precision_name

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as root:
        settings = {"bundle_root": root, "num_generations": num_generations, "amp": precision}
        parser = composer.compose(TILE_CONFIGS[network], {**settings, "input_datalist": [{"image": tile}], **overrides})
        torch.manual_seed(0)
        model = parser.get_parsed_content("network_def").eval()
        image = parser.get_parsed_content("dataset")[0]["image"][None]
        inferer = parser.get_parsed_content("inferer")
        with torch.no_grad():
            inferer(image[..., :32, :32], model)  # warm-up (one-off allocations, the bf16 weight casts)
            start = time.perf_counter()
            inferer(image, model)
            seconds = time.perf_counter() - start
        roi = [int(v) for v in parser.get_parsed_content("roi_size")]
        windows = _window_count(list(image.shape[2:]), roi, float(parser.get_parsed_content("window_overlap")))
        meta = copy.deepcopy(model).to("meta")
        encoder, step = _call_flops(meta, image.shape[1], int(parser["label_channels"]), roi)
        steps = int(parser.get_parsed_content("num_timesteps"))
        queue.put(
            {
                "network": network,
                "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "amp": precision,
                "precision": precision_name(precision, image.device),
                "input_shape": list(image.shape[2:]),
                "windows": windows,
                "steps": steps,
                "gflops": windows * (encoder + num_generations * steps * step) / 1e9,
                "seconds": seconds,
                "peak_rss_mib": _peak_rss_mib(),
            }
        )


def _spawn(target, *args) -> dict:
    """``target(*args, queue)`` in a fresh process (its peak RSS its own); what it put in the queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    out = queue.get()
    process.join()
    return out


def protocol_flops(parser: ConfigParser, network: torch.nn.Module, image: torch.Tensor) -> dict:
    """Windows, rows and FLOPs of the protocol on this volume (meta-device count, no arithmetic)."""
    roi = [int(s) for s in parser.get_parsed_content("roi_size")]
    axis = int(parser.get_parsed_content("slice_axis"))
    overlap = float(parser.get_parsed_content("window_overlap"))
    spatial = list(image.shape[2:])
    slices = spatial.pop(axis)
    per_slice = _window_count(spatial, roi, overlap)
    windows = per_slice * slices
    generations = int(parser["num_generations"])
    steps = int(parser.get_parsed_content("num_timesteps"))
    meta = copy.deepcopy(network).to("meta")
    channels = (image.shape[1], int(parser.get_parsed_content("label_channels")))
    encoder, step = _call_flops(meta, *channels, roi)
    total = windows * encoder + windows * generations * steps * step
    # the fast protocol: one slice per window, padded as the inferer pads it
    divisor = math.lcm(parser.get_parsed_content("inferer").size_divisor, network_size_divisor(network))
    whole = [-(-s // divisor) * divisor for s in spatial]
    whole_encoder, whole_step = _call_flops(meta, *channels, whole)
    return {
        "windows_per_slice": per_slice,
        "slices": slices,
        "windows": windows,
        "rows": windows * generations,
        "steps": steps,
        "encoder_flops_per_window": encoder,
        "generator_flops_per_row_step": step,
        "total_gflops": total / 1e9,
        "whole_slice_shape": whole,
        "whole_slices_gflops": (slices * whole_encoder + slices * generations * steps * whole_step) / 1e9,
    }


@torch.no_grad()
def best_generator_rate(
    parser: ConfigParser,
    network: torch.nn.Module,
    image: torch.Tensor,
    flops: dict,
    batch_rows: tuple[int, ...] = (10, 20, 40, 80, 160, 320),
) -> dict:
    """The generator's best GFLOP/s over batch sizes on this machine (channels-last inputs, the layer shapes of the
    protocol), and the batch that gives it."""
    rates = {}
    for rows in batch_rows:
        x_t, t, z, features = _generator_inputs(parser, network, image, rows)
        network(x_t, t, z, image_features=features)  # warm-up
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            network(x_t, t, z, image_features=features)
            best = min(best, time.perf_counter() - start)
        rates[rows] = rows * flops["generator_flops_per_row_step"] / best / 1e9
    rows = max(rates, key=rates.get)
    return {"gflops_by_rows": rates, "best_rows": rows, "best_gflops": rates[rows]}


def _category(op: str) -> str:
    """The kind of work an ATen operator does: the FLOP-counted ones (convolution, dense, attention) or not."""
    name = op.removeprefix("aten::")
    if "conv" in name:
        return "convolution"
    if "scaled_dot_product" in name or name in {"bmm", "baddbmm", "_softmax", "softmax"}:
        return "attention"
    if name in {"addmm", "mm", "matmul", "linear"}:
        return "dense"
    if "norm" in name:
        return "normalisation"
    return "element-wise and other"


FLOP_KINDS = ("convolution", "dense", "attention")


@torch.no_grad()
def time_breakdown(
    parser: ConfigParser, network: torch.nn.Module, image: torch.Tensor, rows: int, calls: int = 3
) -> dict:
    """Where one generator call's time goes at ``rows`` rows (the serving batch): each operator's own time (torch
    profiler, ``calls`` calls after a warm-up) summed by kind. The FLOP-counted kinds' share gives a stricter bound
    than the generator's rate: the time the protocol would take if the normalisations, activations, affine maps,
    residual sums and copies (no FLOPs in the count) cost nothing and the convolutions kept their measured speed."""
    from torch.profiler import ProfilerActivity, profile

    x_t, t, z, features = _generator_inputs(parser, network, image, rows)
    network(x_t, t, z, image_features=features)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            network(x_t, t, z, image_features=features)
    seconds: dict[str, float] = {}
    for event in prof.key_averages():
        kind = _category(event.key)
        seconds[kind] = seconds.get(kind, 0.0) + event.self_cpu_time_total / 1e6 / calls
    total = sum(seconds.values())
    share = {kind: value / total for kind, value in sorted(seconds.items(), key=lambda kv: -kv[1])}
    return {
        "rows": rows,
        "seconds_per_call": seconds,
        "share": share,
        "flop_kinds_share": sum(share.get(kind, 0.0) for kind in FLOP_KINDS),
    }


def markdown_section(result: dict) -> str:
    m, f, r = result["machine"], result["flops"], result["rate"]
    lines = [
        f"## Serving one Hippocampus volume, paper protocol ({result['date']})",
        "",
        f"`{result['command']}` on {m['cpu']} ({m['logical_cores']} logical cores, {m['torch_threads']} torch "
        f"thread(s), load average {m['load_average_start'][0]:.1f} at the start), torch {m['torch']}, "
        f"monai {m['monai']}. Volume `{result['volume']}` {result['shape']}; the shipped cDAL model; "
        f"{f['windows']} windows ({f['windows_per_slice']} per slice x {f['slices']} slices, 32 x 32, overlap "
        f"0.75) x N = {result['num_generations']} x T = {f['steps']} steps.",
        "",
        f"- FLOPs: {f['total_gflops']:.0f} GFLOP per volume (encoder "
        f"{f['encoder_flops_per_window'] / 1e6:.0f} MFLOP per window, generator "
        f"{f['generator_flops_per_row_step'] / 1e6:.0f} MFLOP per row and step).",
        f"- Whole slices (the fast protocol, {f['slices']} slices padded to {f['whole_slice_shape']}): "
        f"{f['whole_slices_gflops']:.0f} GFLOP per volume.",
        f"- The generator's best rate here: {r['best_gflops']:.1f} GFLOP/s at {r['best_rows']} rows per call "
        f"(" + ", ".join(f"{k}: {v:.1f}" for k, v in r["gflops_by_rows"].items()) + "); fp32 matmul peak "
        f"{result['matmul_peak_gflops']:.1f} GFLOP/s. Lower bound: {result['lower_bound_seconds']:.1f} s per volume.",
    ]
    b = result.get("breakdown")
    if b:
        lines.append(
            f"- Where one generator call's time goes ({b['rows']} rows, operators' own time, torch profiler): "
            + ", ".join(f"{kind} {share:.0%}" for kind, share in b["share"].items())
            + f". Stricter bound, the FLOP-counted operators alone ({b['flop_kinds_share']:.0%} of the call): "
            f"{result['strict_lower_bound_seconds']:.1f} s per volume."
        )
    lines += [
        "",
        "| path | windows per batch (rows) | NHWC inputs | s / volume | x lower bound | x stricter bound | speed-up "
        "| peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = result["paths"]["baseline"]["seconds"]
    repeats = len(result["paths"]["baseline"].get("seconds_runs", [0]))
    for name, p in result["paths"].items():
        bound = result["lower_bound_seconds"] if name != "whole_slices" else result["whole_slices_lower_bound_seconds"]
        strict = bound * (b["flop_kinds_share"] if b else float("nan"))
        runs, ratios = p.get("seconds_runs", [p["seconds"]]), p.get("speed_up_runs", [base / p["seconds"]])
        spread = f" ({min(runs):.1f}-{max(runs):.1f})" if repeats > 1 else ""
        ratio_spread = f" ({min(ratios):.2f}-{max(ratios):.2f}x)" if repeats > 1 else ""
        lines.append(
            f"| {name} | {p['windows_per_batch']} ({p['windows_per_batch'] * result['num_generations']}) | "
            f"{'yes' if p['channels_last'] else 'no'} | {p['seconds']:.1f}{spread} | "
            f"{p['seconds'] / bound:.2f} | {p['seconds'] / strict:.2f} | {base / p['seconds']:.2f}x{ratio_spread} | "
            f"{p['peak_rss_mib']:.0f} |"
        )
    if repeats > 1:
        lines += [
            "",
            f"Each path ran {repeats} times, the paths interleaved (each in a fresh process); seconds are the median "
            "(range); the speed-up is the ratio of the medians (range: the ratio within each repeat).",
        ]
    lines += [
        "",
        f"Largest difference between the baseline's and the default's ensemble means: "
        f"{result['max_mean_difference']:.1e} (the same noise; NHWC and the in-place arithmetic change only the order "
        "and rounding of the sums). The whole-slice row's bound is its own FLOPs over the same rate (measured on the "
        "protocol's windows); it computes other windows, so its output differs.",
        "",
    ]
    tiles = result.get("tile")
    if tiles:
        first = tiles[0]
        lines += [
            f"MoNuSeg tile `{result['tile_name']}` ({first['network']} cDAL network, {first['parameters_m']:.1f} M "
            f"parameters, initial weights): resized to {first['input_shape']}, {first['windows']} windows, "
            f"N = {result['num_generations']}, T = {first['steps']}; {first['gflops']:.0f} GFLOP per tile.",
            "",
            "| amp | network precision | s / tile | GFLOP/s | speed-up over fp32 | peak RSS (MiB) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for t in tiles:
            lines.append(
                f"| {t['amp']} | {t['precision']} | {t['seconds']:.1f} | {t['gflops'] / t['seconds']:.1f} | "
                f"{first['seconds'] / t['seconds']:.2f}x | {t['peak_rss_mib']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def summarise_runs(runs: list[dict]) -> dict:
    """One path's repeats: the median seconds (and every run's), the largest peak RSS."""
    seconds = [run["seconds"] for run in runs]
    return {
        "seconds": statistics.median(seconds),
        "seconds_runs": seconds,
        "windows_per_batch": runs[0]["windows_per_batch"],
        "channels_last": runs[0]["channels_last"],
        "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
    }


def main(argv: list[str] | None = None) -> dict:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--volume", type=Path, default=DEFAULT_VOLUME / "hippocampus_001.nii.gz")
    cli.add_argument("--num_generations", type=int, default=5)
    cli.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    cli.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS, help="baseline must be first when given")
    cli.add_argument(
        "--repeats", type=int, default=1, help="runs of each path, interleaved (the table gives the medians)"
    )
    cli.add_argument("--rate_rows", type=int, nargs="+", default=[10, 20, 40, 80, 160, 320], help="batch rows tried")
    cli.add_argument("--tile", type=Path, default=DEFAULT_TILE / "TCGA-B0-5698-01Z-00-DX1.tif", help="MoNuSeg tile")
    cli.add_argument(
        "--tile_network", choices=[*TILE_CONFIGS, "none"], default="paper", help="cDAL serving the tile (none: skip)"
    )
    cli.add_argument(
        "--tile_set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for the tile (YAML values)"
    )
    cli.add_argument("--json", type=Path, default=None, help="JSON output (default eval/serving_<time>.json)")
    cli.add_argument("--markdown", type=Path, default=REPO / "docs" / "benchmarks.md")
    cli.add_argument("--no_markdown", action="store_true")
    args = cli.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if not args.volume.is_file():
        raise SystemExit(f"{args.volume}: no such volume (give --volume <a .nii.gz>)")
    torch.set_num_threads(args.threads)
    machine = machine_description(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as root:
        parser = parse(root, args.volume, args.num_generations)
        network, image = load(parser)
        flops = protocol_flops(parser, network, image)
        rate = best_generator_rate(parser, network, image, flops, tuple(args.rate_rows))
        breakdown = time_breakdown(
            parser, network, image, int(parser.get_parsed_content("window_batch_size")) * args.num_generations
        )
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python tools/benchmark_serving.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "volume": args.volume.name,
        "shape": list(image.shape[2:]),
        "num_generations": args.num_generations,
        "matmul_peak_gflops": measure_matmul_peak(),
        "flops": flops,
        "rate": rate,
        "lower_bound_seconds": flops["total_gflops"] / rate["best_gflops"],
        "whole_slices_lower_bound_seconds": flops["whole_slices_gflops"] / rate["best_gflops"],
        "breakdown": breakdown,
        "strict_lower_bound_seconds": flops["total_gflops"] / rate["best_gflops"] * breakdown["flop_kinds_share"],
        "paths": {},
    }
    summary = ("shape", "flops", "rate", "lower_bound_seconds", "breakdown", "strict_lower_bound_seconds")
    print(json.dumps({k: result[k] for k in summary}, indent=1), flush=True)
    means, runs = {}, {name: [] for name in args.paths}
    for repeat in range(args.repeats):  # the paths interleaved, so that a drift of the machine's speed hits all
        for name in args.paths:
            out = _spawn(run_path, name, str(args.volume), args.num_generations, args.threads)
            mean = torch.from_numpy(out.pop("mean"))
            means.setdefault(name, mean)
            runs[name].append(out)
            print(f"repeat {repeat + 1}/{args.repeats}", name, out, flush=True)
    result["paths"] = {name: summarise_runs(path_runs) for name, path_runs in runs.items()}
    if "baseline" in runs:
        base = [run["seconds"] for run in runs["baseline"]]
        for name, path in result["paths"].items():
            path["speed_up_runs"] = [b / run["seconds"] for b, run in zip(base, runs[name])]
    if args.tile_network != "none":
        if not args.tile.is_file():
            raise SystemExit(f"{args.tile}: no such tile (give --tile <a MoNuSeg .tif> or --tile_network none)")
        result["tile_name"] = args.tile.name
        result["tile"] = []
        for precision in TILE_PRECISIONS:
            overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.tile_set)}
            out = _spawn(
                run_tile, args.tile_network, precision, str(args.tile), args.num_generations, args.threads, overrides
            )
            result["tile"].append(out)
            print("tile", out, flush=True)
    if {"baseline", "default"} <= set(means):
        result["max_mean_difference"] = float((means["baseline"] - means["default"]).abs().max())
    out_path = args.json or REPO / "eval" / f"serving_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_path}")
    if not args.no_markdown and {"baseline", "default"} <= set(means):
        text = args.markdown.read_text() if args.markdown.exists() else "# Benchmarks\n"
        args.markdown.write_text(text.rstrip("\n") + "\n\n" + markdown_section(result))
        print(f"appended to {args.markdown}")
    return result


if __name__ == "__main__":
    main()
