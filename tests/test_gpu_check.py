"""tools/gpu_check.py keeps working without a GPU: its tiny CPU run executes every step for real (the benchmark,
one epoch of the main job in fp32 and with the fast-path switches, the paper cDAL profile, torchrun with gloo) and
writes its JSON and Markdown."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import gpu_check  # noqa: E402

STEPS = ["benchmark", "main_job_fp32", "main_job_fast", "paper_cdal", "torchrun"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA run is the real check (minutes), not a test")
def test_the_tiny_cpu_run_executes_every_step_and_reports_them(tmp_path):
    result = gpu_check.main(
        ["--tiny", "--work_dir", str(tmp_path / "work"), "--json", str(tmp_path / "check.json"),
         "--markdown", str(tmp_path / "check.md")]
    )  # fmt: skip
    assert [s["name"] for s in result["steps"]] == STEPS
    failed = {s["name"]: s["tail"] for s in result["steps"] if s["status"] != "ok"}
    assert failed == {}
    runs = tmp_path / "work" / "runs"
    for run in ("fp32", "fast", "paper", "ddp"):  # each training wrote its model and resumable checkpoint
        assert (runs / run / "models" / "checkpoints" / "last.pt").is_file(), run
    rows = result["benchmark_rows"]
    assert rows and rows[0]["method"] == "cdal" and rows[0]["seconds_project_cpu"] > 0
    assert json.loads((tmp_path / "check.json").read_text())["steps"][0]["name"] == "benchmark"
    text = (tmp_path / "check.md").read_text()
    assert "## GPU check" in text and "tiny CPU smoke run" in text and text.count("| ok |") == len(STEPS)
