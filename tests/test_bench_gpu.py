"""benchmarks/bench_gpu.py: without CUDA one skip line and exit 0; its code paths (every measurement, with and
without bf16) run at toy sizes on the CPU and print the issue's JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import bench_gpu
from tests.conftest import REPO

KEYS = ["what", "amp", "samples_per_s", "peak_mem_gb", "host_share"]


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark would run")
def test_without_cuda_it_prints_one_skip_line_and_exits_0():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_gpu.py")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert lines(done.stdout) == [
        {"what": "skipped", "reason": "CUDA is not available: bench_gpu.py measures GPU steps"}
    ]


@pytest.mark.slow
def test_small_cpu_mode_runs_every_measurement_with_and_without_bf16(capsys):
    assert bench_gpu.main(["--device", "cpu", "--small", "--steps", "1"]) == 0
    records = lines(capsys.readouterr().out)
    assert [(r["what"], r["amp"]) for r in records] == [
        (what, amp) for amp in ("none", "bf16") for what in bench_gpu.BENCHMARKS
    ]
    for record in records:
        assert list(record) == KEYS
        assert record["samples_per_s"] > 0
        assert record["peak_mem_gb"] is None and record["host_share"] is None  # GPU-only figures


def test_the_cpu_runs_only_the_small_sizes(capsys):
    with pytest.raises(SystemExit):
        bench_gpu.main(["--device", "cpu"])
    assert "--device cpu runs only with --small" in capsys.readouterr().err
