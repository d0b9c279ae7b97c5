"""scripts/benchmark_serving.py runs end to end (small synthetic volume, one generation, small rate sweep)."""

import json
import sys
from pathlib import Path

from bundle.data.hippocampus import write_synthetic_hippocampus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchmark_serving  # noqa: E402


def test_serving_benchmark_reports_flops_bound_and_equal_paths(tmp_path):
    msd = write_synthetic_hippocampus(tmp_path / "msd", num_cases=1, shape=(12, 16, 6), seed=1)
    volume = next((msd / "imagesTr").glob("*.nii.gz"))
    markdown = tmp_path / "benchmarks.md"
    result = benchmark_serving.main(
        ["--volume", str(volume), "--num_generations", "1", "--threads", "1", "--rate_rows", "2", "4", "--paths", "baseline", "default",
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
    assert all(p["seconds"] > 0 and p["peak_rss_mib"] > 100 for p in result["paths"].values())
    assert json.loads((tmp_path / "serving.json").read_text())["flops"] == f
    text = markdown.read_text()
    assert "## Serving one Hippocampus volume, paper protocol" in text
    assert text.count("\n| ") == 4  # header, rule, 2 paths
