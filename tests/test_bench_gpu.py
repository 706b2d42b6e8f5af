"""bench/bench_gpu.py and bench/gpu_check.sh, the parts that run on a CPU: argument defaults, the
tiny --device cpu --quick run of every section, the torch-twin cut-off, the script's syntax."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import bench_gpu


def test_defaults_are_the_gpu_matrix(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = bench_gpu.parse_args([])
    assert args.device == "cuda" and args.sections == list(bench_gpu.SECTIONS)
    assert args.resolutions == [512, 1024] and args.counts == [100_000, 500_000, 1_000_000]
    assert args.backends == ["cuda", "gsplat", "torch"] and args.out == tmp_path
    quick = bench_gpu.parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path / "q")])
    assert quick.resolutions == [32] and quick.counts == [300] and quick.repeats == 1
    cmd = bench_gpu.generate_command("cuda", tmp_path, quick=False)
    assert cmd[1:7] == ["-m", "dreamlab", "generate", "a red cube", "--device", "cuda"]


def test_quick_cpu_run_writes_every_section(tmp_path):
    assert bench_gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "gpu_report.md").read_text()
    assert report.startswith("# dreamlab GPU check: CPU")
    for title in ("## Rasterizer", "## Guidance steps", "## Builtin prior training", "## Full run"):
        assert title in report
    rows = [line for line in report.splitlines() if line.startswith("| 32² | 300 |")]
    assert len(rows) == 3
    torch_row = next(r for r in rows if "| torch |" in r)
    assert float(torch_row.split("|")[4]) > 0  # forward ms measured
    assert all("needs the Gaussians on a CUDA GPU" in r for r in rows if "| torch |" not in r)
    assert "| SDS |" in report and "| VSD |" in report
    assert "backend 'auto' on cpu -> torch" in report and "failed" not in report
    fp32_row = next(line for line in report.splitlines() if line.startswith("| fp32 |"))
    assert fp32_row.endswith("| +0.00% |")  # the CPU against itself: the same batch, the same loss


def test_torch_twin_stops_after_a_slow_size(tmp_path):
    args = [
        "--device", "cpu", "--quick", "--sections", "raster", "--backends", "torch",
        "--counts", "100", "200", "--torch-step-limit-s", "0", "--out", str(tmp_path),
    ]  # fmt: skip
    assert bench_gpu.main(args) == 0
    report = (tmp_path / "gpu_report.md").read_text()
    assert "| 32² | 100 | torch | skipped" not in report
    assert "| 32² | 200 | torch | skipped (32²/100 took" in report


@pytest.mark.parametrize("script", ["bench/gpu_check.sh"])
def test_gpu_check_script_parses(script):
    proc = subprocess.run(
        ["bash", "-n", str(REPO / script)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
