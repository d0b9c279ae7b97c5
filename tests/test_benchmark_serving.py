"""tools/benchmark_serving.py runs end to end (small synthetic volume, one generation, small rate sweep)."""

import json
import sys
from pathlib import Path

from bundle.data.hippocampus import write_synthetic_hippocampus
from bundle.data.synthetic import write_synthetic_monuseg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import benchmark_serving  # noqa: E402


def test_serving_benchmark_reports_flops_bound_and_equal_paths(tmp_path):
    msd = write_synthetic_hippocampus(tmp_path / "msd", num_cases=1, shape=(12, 16, 6), seed=1)
    volume = next((msd / "imagesTr").glob("*.nii.gz"))
    tile = next((write_synthetic_monuseg(tmp_path / "monuseg", 1, 0, size=96) / "MoNuSegTrainingData").rglob("*.tif"))
    markdown = tmp_path / "benchmarks.md"
    tiny_tile = ["image_size=64", "patch_size=32", "network_def#num_channels=8", "network_def#channel_mult=[1, 2]"]
    result = benchmark_serving.main(
        ["--volume", str(volume), "--num_generations", "1", "--threads", "1", "--rate_rows", "2", "4", "--paths", "baseline", "default",
         "--repeats", "2", "--tile", str(tile), "--tile_network", "cpu", "--tile_set", *tiny_tile,
         "--json", str(tmp_path / "serving.json"), "--markdown", str(markdown)]
    )  # fmt: skip
    f = result["flops"]
    h, w, d = result["shape"]
    # volumes smaller than the 32 x 32 window: one window per axial slice; whole slices padded to multiples of 4
    assert (f["windows_per_slice"], f["slices"], f["windows"], f["rows"]) == (1, d, d, d)
    assert f["whole_slice_shape"] == [-(-h // 4) * 4, -(-w // 4) * 4]
    assert 0 < f["whole_slices_gflops"] < f["total_gflops"]
    assert set(result["paths"]) == {"baseline", "default"}
    assert result["paths"]["baseline"]["channels_last"] is False and result["paths"]["default"]["channels_last"]
    assert result["max_mean_difference"] < 1e-4  # same noise: the layout changes nothing but sums' order
    assert result["lower_bound_seconds"] == f["total_gflops"] / result["rate"]["best_gflops"]
    b = result["breakdown"]  # a generator call's time by kind of operator at the served batch (8 windows x N = 1)
    assert b["rows"] == 8 and abs(sum(b["share"].values()) - 1) < 1e-9
    assert {"convolution", "normalisation", "element-wise and other"} <= set(b["share"])
    assert 0 < b["share"]["convolution"] <= b["flop_kinds_share"] < 1
    assert result["strict_lower_bound_seconds"] == result["lower_bound_seconds"] * b["flop_kinds_share"]
    assert all(p["seconds"] > 0 and p["peak_rss_mib"] > 100 for p in result["paths"].values())
    for p in result["paths"].values():  # two interleaved runs each: the median of two is their mean
        assert len(p["seconds_runs"]) == len(p["speed_up_runs"]) == 2
        assert abs(p["seconds"] - sum(p["seconds_runs"]) / 2) < 1e-9
    base = result["paths"]["baseline"]
    assert base["speed_up_runs"] == [1.0, 1.0]
    assert [b / d for b, d in zip(base["seconds_runs"], result["paths"]["default"]["seconds_runs"])] == result["paths"][
        "default"
    ]["speed_up_runs"]
    assert json.loads((tmp_path / "serving.json").read_text())["flops"] == f
    # the tile at the paper protocol (resized to image_size, non-overlapping windows), fp32 forced and amp auto
    fp32, auto = result["tile"]
    assert (fp32["amp"], fp32["precision"], auto["amp"]) == ("false", "float32", "auto")
    assert auto["precision"] in ("float32", "bfloat16")  # what this machine's hardware gives
    assert fp32["input_shape"] == [64, 64] and fp32["windows"] == 4 and fp32["steps"] == 4
    assert fp32["gflops"] == auto["gflops"] > 0 and all(t["seconds"] > 0 for t in (fp32, auto))
    text = markdown.read_text()
    assert "## Serving one Hippocampus volume, paper protocol" in text and "Stricter bound" in text
    assert text.count("\n| ") == 4 + 4  # header, rule, 2 paths; header, rule, 2 tile rows
    assert "| auto | " in text and "| false | float32 |" in text
    assert "Each path ran 2 times, the paths interleaved" in text


def test_repeats_are_summarised_by_their_median():
    runs = [{"seconds": s, "windows_per_batch": 8, "channels_last": True, "peak_rss_mib": m} for s, m in
            [(3.0, 700), (1.0, 750), (2.0, 720)]]  # fmt: skip
    summary = benchmark_serving.summarise_runs(runs)
    assert summary["seconds"] == 2.0 and summary["seconds_runs"] == [3.0, 1.0, 2.0] and summary["peak_rss_mib"] == 750
    assert benchmark_serving.summarise_runs(runs[:2])["seconds"] == 2.0
    assert benchmark_serving.summarise_runs(runs[1:])["seconds"] == 1.5


def test_operators_are_sorted_into_the_kinds_the_bound_counts():
    kinds = {op: benchmark_serving._category(op) for op in (
        "aten::mkldnn_convolution", "aten::_convolution", "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::addmm", "aten::native_group_norm", "aten::silu", "aten::add", "aten::cat")}  # fmt: skip
    assert kinds == {
        "aten::mkldnn_convolution": "convolution",
        "aten::_convolution": "convolution",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
        "aten::addmm": "dense",
        "aten::native_group_norm": "normalisation",
        "aten::silu": "element-wise and other",
        "aten::add": "element-wise and other",
        "aten::cat": "element-wise and other",
    }
    assert set(benchmark_serving.FLOP_KINDS) == {"convolution", "dense", "attention"}
