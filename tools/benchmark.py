#!/usr/bin/env python
"""Sampling speed per 256x256 image: the project's samplers against the reference codes' naive loops.

For SegDiff (ancestral DDPM, T = 100, N = 9, and DDIM with 25 steps) and cDAL (T = 4, N = 5), each with the
paper-size network (configs/paper/*) and the CPU-profile network (configs/methods/*), it reports:

- seconds per image of the naive loop of the reference code (the image encoder recomputed inside every network
  call, generations one after another at batch 1) and of the project's path (``EnsembleInferer``: the
  encoder once per image), the latter both as configured (the N generations as one batch) and with the CPU
  setting (generations in chunks of 1, channels-last memory format), and the ratios;
- the network FLOPs per image of both (``torch.utils.flop_counter.FlopCounterMode``), and the achieved FLOP/s
  against this machine's fp32 matmul peak, measured here;
- with ``--amp`` / ``--compile`` (the bundle's fast-path switches), a further project column: the CPU setting with
  the network forwards under bf16 autocast (``EnsembleInferer(autocast="bfloat16")``) and/or
  ``torch.compile``d, against the bf16 matmul peak when ``--amp`` is on. ``--device cuda`` runs everything on the
  GPU (times synchronised).

SegDiff at T = 100 takes hours per image at paper size, so every path is timed per network call (a one-step chain
through the real code path) and the chains are extrapolated (T steps x N generations; the network's cost does not
depend on t); a whole-chain run of the cDAL CPU-profile network checks the extrapolation. Results go to a JSON
file and are appended, dated and with the machine description, to docs/benchmarks.md (created if absent, never
overwritten).

    python tools/benchmark.py                       # everything (10-30 minutes on 2 CPU cores)
    python tools/benchmark.py --profiles cpu --methods cdal --no_markdown
    python tools/benchmark.py --methods cdal --amp --channels_last   # bf16 autocast (AMX / tensor cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import monai
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bundle import composer
from bundle.diffusion.cdal_schedule import make_cdal_scheduler
from bundle.diffusion.diffusion_sampler import DiffusionSampler, UncachedImageNetwork
from bundle.diffusion.segdiff_schedule import make_segdiff_scheduler
from bundle.inferers.autocast import AutocastNetwork, autocast_dtype
from bundle.inferers.ensemble import EnsembleInferer

REPO = Path(__file__).resolve().parents[1]
# (method, profile) -> the composer's arguments (training configs; the MoNuSeg paper sizes or the CPU profile)
CONFIGS = {
    ("segdiff", "paper"): {"method": "segdiff", "dataset": "monuseg", "paper": True},
    ("segdiff", "cpu"): {"method": "segdiff"},
    ("cdal", "paper"): {"method": "cdal", "dataset": "monuseg", "paper": True},
    ("cdal", "cpu"): {"method": "cdal"},
}
# (sampler label, steps per generation, generations N); SegDiff's naive reference is always DDPM with T = 100
CASES = {"segdiff": [("ddpm", 100, 9), ("ddim", 25, 9)], "cdal": [("posterior", 4, 5)]}


@dataclass
class Row:
    method: str
    profile: str
    sampler: str
    steps: int
    generations: int
    params_m: float
    gflop_naive: float
    gflop_project: float
    seconds_naive: float
    seconds_project_batch: float
    seconds_project_cpu: float
    speedup_batch: float
    speedup_cpu: float
    speedup_cpu_vs_reference_loop: float
    gflops_naive: float
    gflops_project_cpu: float
    percent_of_peak_naive: float
    percent_of_peak_project_cpu: float
    timing: str
    fast_paths: str = ""
    seconds_project_fast: float | None = None
    speedup_fast: float | None = None
    gflops_project_fast: float | None = None
    percent_of_peak_project_fast: float | None = None
    detail: dict = field(default_factory=dict)


def machine_description(threads: int) -> dict:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_start": list(os.getloadavg()),
    }


DEVICE = torch.device("cpu")


def measure_matmul_peak(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of a square ``dtype`` matmul (2 n^3 FLOP) on ``DEVICE`` over ``repeats`` runs after a warm-up."""
    a = torch.randn(size, size, device=DEVICE, dtype=dtype)
    b = torch.randn(size, size, device=DEVICE, dtype=dtype)
    torch.mm(a, b)
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _seconds(fn: Callable[[], object]) -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``repeats`` calls, after one discarded warm-up call when ``warmup``."""
    if warmup:
        fn()
    return statistics.median(_seconds(fn) for _ in range(repeats))


def network_flops(method: str, network: nn.Module, size: int) -> dict[str, float]:
    """FLOPs of one generation's network calls at batch 1, counted on a meta-device copy (no arithmetic runs).

    ``encoder``: the image encoder; ``naive_call``: a call with the image (encoder inside, the reference loop);
    ``step``: a call with cached image features (the project's per-step cost per generation).
    """
    meta = copy.deepcopy(network).to("meta")
    image = torch.empty(1, 3, size, size, device="meta")
    x_t = torch.empty(1, 1, size, size, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    latent = (torch.empty(1, meta.nz, device="meta"),) if method == "cdal" else ()
    counts = {}
    for name, call in (
        ("encoder", lambda: meta.encode_image(image)),
        ("naive_call", lambda: meta(x_t, t, *latent, image=image)),
        ("step", lambda: meta(x_t, t, *latent, image_features=meta.encode_image(image))),
    ):
        with FlopCounterMode(display=False) as counter:
            call()
        counts[name] = float(counter.get_total_flops())
    counts["step"] -= counts["encoder"]
    return counts


def build_network(method: str, profile: str, size: int) -> nn.Module:
    """The ``network_def`` of the method/profile configs, for ``size`` x ``size`` tiles, in eval mode."""
    parser = composer.compose(
        composer.config_files("training", **CONFIGS[(method, profile)]), {"patch_size": size, "label_channels": 1}
    )
    torch.manual_seed(0)
    return parser.get_parsed_content("network_def").eval().to(DEVICE)


def _generators(rows: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator(device=DEVICE).manual_seed(seed + r) for r in range(rows)]


def naive_loop(sampler: DiffusionSampler, network: nn.Module, image: torch.Tensor, generations: int) -> torch.Tensor:
    """The reference loop: generations one after another at batch 1, the encoder inside every network call."""
    uncached = UncachedImageNetwork(network)
    shape = (1, *image.shape[2:])
    return torch.cat([sampler.chain(uncached, image, shape, _generators(1, seed=g)) for g in range(generations)])


def project_path(
    sampler: DiffusionSampler,
    network: nn.Module,
    image: torch.Tensor,
    generations: int,
    generation_batch_size: int | None = None,
    autocast: str | None = None,
) -> torch.Tensor:
    """The bundle's path: ``EnsembleInferer`` (encoder once per image, generations batched)."""
    inferer = EnsembleInferer(
        sampler,
        num_generations=generations,
        outputs="mean",
        generation_batch_size=generation_batch_size,
        seed=0,
        autocast=autocast,
    )
    return inferer.ensemble(image, network)


def encoder_call(network: nn.Module, image: torch.Tensor, autocast: str | None = None) -> Callable[[], object]:
    """The image encoder alone, as the inferer runs it (under autocast when asked)."""
    if autocast is None:
        return lambda: network.encode_image(image)
    wrapped = AutocastNetwork(network, autocast_dtype(autocast))
    return lambda: wrapped.encode_image(image)


def step_call(
    sampler: DiffusionSampler, network: nn.Module, image: torch.Tensor, rows: int, autocast: str | None = None
) -> Callable[[], object]:
    """The inferer's sampling call on cached image features for ``rows`` generations (what follows the encoder)."""
    if autocast is not None:
        network = AutocastNetwork(network, autocast_dtype(autocast))
    with torch.no_grad():
        condition = sampler.encode(network, image).repeat_interleave(rows, dim=0)
    shape = (1, *image.shape[2:])
    return lambda: sampler.chain(network, condition, shape, _generators(rows))


def step_sampler(method: str, steps: int) -> DiffusionSampler:
    """A sampler making ``steps`` network calls per generation (the network's cost does not depend on t)."""
    if method == "segdiff":
        return DiffusionSampler(make_segdiff_scheduler(100), num_steps=steps, eta=0.0, clip_x0=True)
    return DiffusionSampler(make_cdal_scheduler(steps))


@torch.no_grad()
def benchmark_network(
    method: str, profile: str, size: int, repeats: int, peak: float, fast: dict | None = None
) -> list[Row]:
    """Per-call times through the real code paths, then seconds per image for each case of ``CASES[method]``.

    Measured directly (one network call per generation, i.e. a one-step chain): the encoder alone; the naive
    loop's call (encoder inside, batch 1); the project's sampler step on cached image features with all N
    generations in one batch; the same for one generation (CPU setting: generations in chunks of 1, network and
    image in channels-last memory format). Per image: naive = N S t_naive; project = t_encoder + S N t_step (the
    inferer runs exactly these two calls). ``fast`` (keys ``amp``, ``compile``, ``peak``) adds the CPU-setting
    measurement with the network forwards under bf16 autocast and/or compiled.
    """
    network = build_network(method, profile, size)
    image = torch.randn(1, 3, size, size, device=DEVICE)
    one_step = step_sampler(method, 1)
    n = CASES[method][0][2]
    warm = profile != "paper"  # paper-size calls take seconds to minutes: no discarded warm-up there
    flops = network_flops(method, network, size)
    flop_encoder, flop_naive, flop_step = flops["encoder"], flops["naive_call"], flops["step"]
    t = {
        "encoder": median_seconds(encoder_call(network, image), repeats, warm),
        "naive_call": median_seconds(lambda: naive_loop(one_step, network, image, 1), repeats, warm),
        f"step_batch_{n}": median_seconds(step_call(one_step, network, image, n), repeats, warm),
    }
    network_cl = network.to(memory_format=torch.channels_last)
    image_cl = image.contiguous(memory_format=torch.channels_last)
    t["encoder_channels_last"] = median_seconds(encoder_call(network_cl, image_cl), repeats, warm)
    t["step_one_generation_channels_last"] = median_seconds(step_call(one_step, network_cl, image_cl, 1), repeats, warm)
    step_batch = t[f"step_batch_{n}"] / n
    step_cpu = t["step_one_generation_channels_last"]
    step_fast = None
    if fast and (fast.get("amp") or fast.get("compile")):
        autocast = "bfloat16" if fast.get("amp") else None
        network_fast = torch.compile(network_cl) if fast.get("compile") else network_cl
        t["encoder_fast"] = median_seconds(encoder_call(network_cl, image_cl, autocast), repeats, True)
        t["step_one_generation_fast"] = median_seconds(
            step_call(one_step, network_fast, image_cl, 1, autocast), repeats, True
        )  # always one warm-up here: it absorbs the compilation
        step_fast = t["step_one_generation_fast"]
    params = sum(p.numel() for p in network.parameters()) / 1e6
    detail = {
        "seconds": t,
        "seconds_per_generation_step_batch": step_batch,
        "seconds_per_generation_step_cpu": step_cpu,
        "gflop_encoder": flop_encoder / 1e9,
        "gflop_naive_call": flop_naive / 1e9,
        "gflop_step_per_generation": flop_step / 1e9,
        "repeats": repeats,
        "warm_up": warm,
    }
    reference_steps, reference_n = CASES[method][0][1], CASES[method][0][2]
    rows = []
    for label, steps, gens in CASES[method]:
        naive = gens * steps * t["naive_call"]
        batch = t["encoder"] + steps * gens * step_batch
        cpu = t["encoder_channels_last"] + steps * gens * step_cpu
        gflop_naive = gens * steps * flop_naive / 1e9
        gflop_project = (flop_encoder + steps * gens * flop_step) / 1e9
        extra = {}
        if step_fast is not None:
            fast_s = t["encoder_fast"] + steps * gens * step_fast
            extra = dict(
                fast_paths=fast["label"],
                seconds_project_fast=fast_s,
                speedup_fast=naive / fast_s,
                gflops_project_fast=gflop_project / fast_s,
                percent_of_peak_project_fast=100 * gflop_project / fast_s / fast["peak"],
            )
        rows.append(
            Row(
                method=method,
                profile=profile,
                sampler=label,
                steps=steps,
                generations=gens,
                params_m=params,
                gflop_naive=gflop_naive,
                gflop_project=gflop_project,
                seconds_naive=naive,
                seconds_project_batch=batch,
                seconds_project_cpu=cpu,
                speedup_batch=naive / batch,
                speedup_cpu=naive / cpu,
                speedup_cpu_vs_reference_loop=reference_n * reference_steps * t["naive_call"] / cpu,
                gflops_naive=gflop_naive / naive,
                gflops_project_cpu=gflop_project / cpu,
                percent_of_peak_naive=100 * gflop_naive / naive / peak,
                percent_of_peak_project_cpu=100 * gflop_project / cpu / peak,
                timing="per-call times measured, chains extrapolated",
                detail=detail,
                **extra,
            )
        )
    return rows


@torch.no_grad()
def end_to_end_check(profile: str, size: int, repeats: int, fast: dict | None = None) -> dict:
    """Whole cDAL chains (T = 4, N = 5) through both paths, to check the extrapolation of ``benchmark_network``."""
    network = build_network("cdal", profile, size)
    image = torch.randn(1, 3, size, size, device=DEVICE)
    _, steps, n = CASES["cdal"][0]
    sampler = step_sampler("cdal", steps)
    extra = {}
    if fast and (fast.get("amp") or fast.get("compile")):
        network_cl = copy.deepcopy(network).to(memory_format=torch.channels_last)
        network_fast = torch.compile(network_cl) if fast.get("compile") else network_cl
        autocast = "bfloat16" if fast.get("amp") else None
        extra["seconds_project_fast"] = median_seconds(
            lambda: project_path(
                sampler,
                network_fast,
                image.contiguous(memory_format=torch.channels_last),
                n,
                generation_batch_size=1,
                autocast=autocast,
            ),
            repeats,
        )
        extra["fast_paths"] = fast["label"]
    return {
        **extra,
        "method": "cdal",
        "profile": profile,
        "steps": steps,
        "generations": n,
        "seconds_naive": median_seconds(lambda: naive_loop(sampler, network, image, n), repeats),
        "seconds_project_batch": median_seconds(lambda: project_path(sampler, network, image, n), repeats),
        "seconds_project_one_generation_chunks": median_seconds(
            lambda: project_path(sampler, network, image, n, generation_batch_size=1), repeats
        ),
        "seconds_project_cpu_setting": median_seconds(
            lambda: project_path(
                sampler,
                network.to(memory_format=torch.channels_last),
                image.contiguous(memory_format=torch.channels_last),
                n,
                generation_batch_size=1,
            ),
            repeats,
        ),
    }


def fmt_load(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def markdown_section(result: dict) -> str:
    machine, peak, rows = result["machine"], result["matmul_peak_gflops"], result["rows"]
    size = result["image_size"]
    lines = [
        f"## {result['date']}: {machine['cpu']}, {machine['logical_cores']} logical cores, torch {machine['torch']} "
        f"({machine['torch_threads']} threads)" + (f", {machine['gpu']}" if machine.get("gpu") else ""),
        "",
        f"Command: `{result['command']}`. fp32 matmul peak measured by the script (best of the start and the end): "
        f"**{peak:.1f} GFLOP/s** on {machine.get('device', 'cpu')} ({result['matmul_peak_gflops_start']:.1f} at the start, "
        f"{result['matmul_peak_gflops_end']:.1f} at the end). One {size}x{size} image per row. Load average "
        f"(1/5/15 min) {fmt_load(machine['load_average_start'])} at the start and "
        f"{fmt_load(machine['load_average_end'])} at the end (above 0: other jobs shared the cores).",
        "",
        "| method | network | sampler | steps | N | params (M) | GFLOP/image naive / project | s/image naive "
        "| s/image project, one batch | s/image project, CPU setting | speed-up one batch | speed-up CPU setting "
        "| naive GFLOP/s (% peak) | project GFLOP/s (% peak) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fast_rows = [r for r in rows if r.get("seconds_project_fast") is not None]
    if fast_rows:
        lines[-2] = lines[-2][:-1] + (
            f"| s/image project, + {fast_rows[0]['fast_paths']} | speed-up + fast paths "
            "| fast GFLOP/s (% of its peak) |"
        )
        lines[-1] += "---|---|---|"
    for r in rows:
        fast_cells = ""
        if fast_rows:
            fast_cells = (
                " n/a | n/a | n/a |"
                if r.get("seconds_project_fast") is None
                else f" {r['seconds_project_fast']:,.1f} | **{r['speedup_fast']:.2f}x** "
                f"| {r['gflops_project_fast']:.1f} ({r['percent_of_peak_project_fast']:.0f} %) |"
            )
        lines.append(
            f"| {r['method']} | {r['profile']} | {r['sampler']} | {r['steps']} | {r['generations']} "
            f"| {r['params_m']:.1f} | {r['gflop_naive']:,.0f} / {r['gflop_project']:,.0f} | {r['seconds_naive']:,.1f} "
            f"| {r['seconds_project_batch']:,.1f} | {r['seconds_project_cpu']:,.1f} | {r['speedup_batch']:.2f}x "
            f"| **{r['speedup_cpu']:.2f}x** | {r['gflops_naive']:.1f} ({r['percent_of_peak_naive']:.0f} %) "
            f"| {r['gflops_project_cpu']:.1f} ({r['percent_of_peak_project_cpu']:.0f} %) |" + fast_cells
        )
    lines += [
        "",
        "- naive = the reference loop (encoder recomputed in every network call, generations one after another at "
        "batch 1, default memory format). Project, one batch = `EnsembleInferer` as configured (encoder once "
        "per image, the N generations as one batch). Project, CPU setting = the same inferer with "
        "`generation_batch_size=1` and the network in channels-last memory format. Per-call times are measured "
        "through these code paths (one network call per generation); the chains (T steps x N generations) are "
        "extrapolated from them. Project GFLOP/s are for the CPU setting.",
    ]
    if fast_rows:
        lines.append(
            f"- Fast paths = the CPU setting with {fast_rows[0]['fast_paths']} (the bundle's `amp` / "
            f'`compile` switches; `amp` = the inferer\'s `autocast="bfloat16"`). Its % of peak is against the '
            f"measured bf16 matmul peak ({result['matmul_peak_gflops_bf16']:.1f} GFLOP/s) when bf16 is on."
        )
    for r in rows:
        if r["sampler"] == "ddim":
            lines.append(
                f"- SegDiff DDIM {r['steps']} ({r['profile']}) against the reference DDPM-100 loop: "
                f"{r['speedup_cpu_vs_reference_loop']:.1f}x."
            )
    for check in result.get("end_to_end", []):
        lines.append(
            f"- End-to-end check, cDAL {check['profile']} (T = {check['steps']}, N = {check['generations']}, measured "
            f"whole chains): naive {check['seconds_naive']:.1f} s, project one batch "
            f"{check['seconds_project_batch']:.1f} s, project in chunks of 1 {check['seconds_project_one_generation_chunks']:.1f} s, "
            f"CPU setting {check['seconds_project_cpu_setting']:.1f} s"
            + (
                f", + {check['fast_paths']} {check['seconds_project_fast']:.1f} s."
                if "seconds_project_fast" in check
                else "."
            )
        )
    return "\n".join(lines) + "\n"


MARKDOWN_HEADER = """# Sampling benchmarks

Written by `tools/benchmark.py` (each run appends a dated section; the JSON it writes holds every measured
component). Targets on the 2-core CPU: the project's SegDiff sampler at least 3x faster than the reference loop,
cDAL at least 1.5x. The FLOP counts are the networks' (convolutions, matmuls, attention) from
`torch.utils.flop_counter`; element-wise work (norms, activations) is not counted, so "% peak" understates how busy
the cores are.
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["segdiff", "cdal"], choices=["segdiff", "cdal"])
    parser.add_argument("--profiles", nargs="+", default=["paper", "cpu"], choices=["paper", "cpu"])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (one tile)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per call (median), CPU profiles")
    parser.add_argument("--paper_repeats", type=int, default=1, help="timed repeats per call, paper-size networks")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no_end_to_end", action="store_true", help="skip the whole-chain cDAL CPU-profile check")
    parser.add_argument("--json", type=Path, default=None, help="JSON output (default eval/benchmark_<time>.json)")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--no_markdown", action="store_true", help="do not append to the Markdown file")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--amp", action="store_true", help="fast-path column: network forwards under bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="fast-path column: torch.compile the network")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_description(torch.get_num_threads())
    machine["device"] = str(DEVICE)
    if DEVICE.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(DEVICE)
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python tools/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "image_size": args.size,
    }
    peak = result["matmul_peak_gflops"] = result["matmul_peak_gflops_start"] = measure_matmul_peak()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s on {machine['cpu']} ({machine['torch_threads']} threads)", flush=True)
    fast = None
    if args.amp or args.compile:
        label = " + ".join(name for name, on in (("bf16 autocast", args.amp), ("torch.compile", args.compile)) if on)
        fast = {"amp": args.amp, "compile": args.compile, "label": label, "peak": peak}
        if args.amp:
            fast["peak"] = result["matmul_peak_gflops_bf16"] = measure_matmul_peak(dtype=torch.bfloat16)
            print(f"bf16 matmul peak: {fast['peak']:.1f} GFLOP/s", flush=True)
    rows: list[Row] = []
    for method in args.methods:
        for profile in args.profiles:
            start = time.perf_counter()
            repeats = args.paper_repeats if profile == "paper" else args.repeats
            new = benchmark_network(method, profile, args.size, repeats, peak, fast)
            for r in new:
                print(
                    f"{r.method:8s} {r.profile:6s} {r.sampler:9s} naive {r.seconds_naive:10.1f} s  project "
                    f"{r.seconds_project_batch:9.1f} s (one batch, {r.speedup_batch:4.2f}x)  "
                    f"{r.seconds_project_cpu:9.1f} s (CPU setting, {r.speedup_cpu:4.2f}x)  "
                    f"{r.gflops_project_cpu:6.1f} GFLOP/s ({r.percent_of_peak_project_cpu:.0f} % of peak)"
                    + (
                        f"  {r.seconds_project_fast:9.1f} s (+ {r.fast_paths}, {r.speedup_fast:4.2f}x)"
                        if r.seconds_project_fast is not None
                        else ""
                    ),
                    flush=True,
                )
            print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
            rows += new
    result["end_to_end"] = []
    if "cdal" in args.methods and "cpu" in args.profiles and not args.no_end_to_end:
        result["end_to_end"].append(end_to_end_check("cpu", args.size, args.repeats, fast))
        print(f"end-to-end check: {result['end_to_end'][-1]}", flush=True)
    machine["load_average_end"] = list(os.getloadavg())
    result["matmul_peak_gflops_end"] = measure_matmul_peak()
    if fast and args.amp:  # the same for the bf16 peak: the best of the start and the end
        result["matmul_peak_gflops_bf16_start"] = fast["peak"]
        result["matmul_peak_gflops_bf16"] = max(fast["peak"], measure_matmul_peak(dtype=torch.bfloat16))
        for row in rows:
            if row.seconds_project_fast is not None:
                row.percent_of_peak_project_fast = 100 * row.gflops_project_fast / result["matmul_peak_gflops_bf16"]
    best = max(peak, result["matmul_peak_gflops_end"])
    if best > peak:  # a busy start under-measures the peak: report against the best of the two measurements
        result["matmul_peak_gflops"] = peak = best
        for row in rows:
            row.percent_of_peak_naive = 100 * row.gflops_naive / peak
            row.percent_of_peak_project_cpu = 100 * row.gflops_project_cpu / peak
    result["rows"] = [asdict(r) for r in rows]
    out = args.json or REPO / "eval" / f"benchmark_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if not args.no_markdown:
        text = args.markdown.read_text() if args.markdown.exists() else MARKDOWN_HEADER
        args.markdown.write_text(text.rstrip("\n") + "\n\n" + markdown_section(result))
        print(f"appended to {args.markdown}")
    return result


if __name__ == "__main__":
    main()
