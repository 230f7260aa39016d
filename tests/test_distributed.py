"""torchrun (gloo, CPU): a 2-process warm start takes the same optimisation steps as one process on the same global
batches, validation scores each segment once, only rank 0 writes, and a NaN or a killed rank ends the whole job."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from epoch_loops.captioning.agent_files import (
    AGENT_FILE,
    MANAGER_VALUE_FILE,
    TRAINING_FILE,
    WORKER_VALUE_FILE,
)
from tests.conftest import REPO, requires_java
from tests.test_captioning import tiny_argv, write_tiny_dataset
from utilities.distributed import share

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def drop_last_row(csv: str) -> int:
    """Remove the last segment of a caption CSV; returns the number left."""
    lines = Path(csv).read_text().splitlines()[:-1]
    Path(csv).write_text("\n".join(lines) + "\n")
    return len(lines) - 1


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 16])
def test_shares_are_contiguous_balanced_and_give_the_batch_back(n):
    for world in (1, 2, 3, 4):
        parts = [share(list(range(n)), r, world) for r in range(world)]
        assert [i for part in parts for i in part] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory) -> dict:
    """The same warm start (dropout off) on 1 process and under torchrun with 2: 11 train segments with --B 2
    (the last global batch has 1 segment: rank 1 steps on a stand-in), val_1 with 3 segments (2 ranks share
    it unevenly: a DistributedSampler would pad it to 4)."""
    if shutil.which("java") is None:
        pytest.skip("Java is not installed")
    root = tmp_path_factory.mktemp("ddp")
    data = write_tiny_dataset(root / "data")
    train_segments = drop_last_row(data["train_meta_path"])
    val_segments = drop_last_row(data["val_1_meta_path"])
    argv = tiny_argv(data, root / "log", "EXP", "--rl_warmstart_epochs", "2", "--epoch_num", "2")
    argv += ["--one_by_one_starts_at", "1", "--dout_p", "0", "--B", "2"]

    def command(exp: str) -> list[str]:
        return [str(REPO / "main.py"), *(exp if a == "EXP" else a for a in argv)]

    one = subprocess.run([sys.executable, *command("one")], env=ENV, capture_output=True, text=True)
    two = subprocess.run([*TORCHRUN, *command("two")], env=ENV, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    runs = root / "log" / "train_rl_cap"
    return {
        "runs": runs,
        "log": root / "log",
        "train_segments": train_segments,
        "val_segments": val_segments,
        "stdout": two.stdout,
    }


def without_times(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    for record in metrics["history"]:
        record.pop("seconds")
    return metrics


@requires_java
def test_two_processes_train_the_weights_of_one(one_and_two):
    runs = one_and_two["runs"]
    a, b = (
        torch.load(runs / r / "checkpoints" / "last" / AGENT_FILE, weights_only=True) for r in ("one", "two")
    )
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-5
    sa, sb = (
        torch.load(runs / r / "checkpoints" / "last" / TRAINING_FILE, weights_only=True)
        for r in ("one", "two")
    )
    assert sa["step"] == sb["step"] == 2 * 6  # 6 global batches per epoch (5 of 2 segments, 1 of 1)
    ma, mb = without_times(runs / "one" / "metrics.json"), without_times(runs / "two" / "metrics.json")
    assert [r["val"] for r in ma["history"][1:]] == [r["val"] for r in mb["history"][1:]]  # identical numbers
    for ra, rb in zip(ma["history"], mb["history"], strict=True):
        assert ra["train"]["loss"] == pytest.approx(rb["train"]["loss"], rel=1e-5)
        assert ra["train"]["grad_norm"] == pytest.approx(rb["train"]["grad_norm"], rel=1e-4)


@requires_java
def test_validation_of_two_processes_scores_each_segment_once(one_and_two):
    runs = one_and_two["runs"]
    for split, count in (("val_1", one_and_two["val_segments"]), ("val_2", 4)):
        for run in ("one", "two"):
            results = json.loads((runs / run / f"captioning_results_{split}_e1.json").read_text())["results"]
            stamps = [tuple(r["timestamp"]) for entries in results.values() for r in entries]
            assert len(stamps) == len(set(stamps)) == count
        assert (runs / "one" / f"captioning_results_{split}_e1.json").read_text() == (
            runs / "two" / f"captioning_results_{split}_e1.json"
        ).read_text()


@requires_java
def test_only_rank_0_writes_and_prints(one_and_two):
    """One run directory with the files of the 1-process run; the console lines appear once. (A write on
    another rank fails the run: RunDir refuses it.)"""
    runs, log_dir = one_and_two["runs"], one_and_two["log"]
    assert sorted(p.name for p in log_dir.iterdir()) == ["train_rl_cap"]
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]

    def files(run: str) -> list[str]:
        return sorted(
            str(p.relative_to(runs / run)) for p in (runs / run).rglob("*") if "events" not in p.name
        )

    assert files("one") == files("two")
    assert one_and_two["stdout"].count("trainable parameters:") == 1
    assert one_and_two["stdout"].count("epoch 1 warm_start") == 1


@requires_java
@pytest.mark.slow
@pytest.mark.parametrize("objective", ["scst", "biased_kl"])
def test_rl_epochs_on_two_processes_train_the_weights_of_one(tmp_path, objective):
    """A warm-start epoch, then a worker and a manager epoch (the other module frozen): every sampled caption
    and explored goal is drawn from its segment's own stream, so 2 processes take the steps of 1."""
    data = write_tiny_dataset(tmp_path / "data")
    drop_last_row(data["train_meta_path"])  # a stand-in step at the end of every epoch
    argv = tiny_argv(data, tmp_path / "log", "EXP", "--rl_warmstart_epochs", "1", "--epoch_num", "3")
    argv += ["--one_by_one_starts_at", "2", "--dout_p", "0", "--B", "2", "--rl_objective", objective]
    if objective == "scst":
        argv += ["--rl_samples", "2", "--scst_baseline", "mean"]
    for exp, launcher in (("one", [sys.executable]), ("two", TORCHRUN)):
        command = [*launcher, str(REPO / "main.py"), *(exp if a == "EXP" else a for a in argv)]
        done = subprocess.run(command, env=ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    runs = tmp_path / "log" / "train_rl_cap"
    for name in (AGENT_FILE, WORKER_VALUE_FILE, MANAGER_VALUE_FILE):
        a, b = (
            torch.load(runs / r / "checkpoints" / "last" / name, weights_only=True) for r in ("one", "two")
        )
        assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-5, name
    ma, mb = without_times(runs / "one" / "metrics.json"), without_times(runs / "two" / "metrics.json")
    assert ma["history"][-1]["val"] == mb["history"][-1]["val"]
    for ra, rb in zip(ma["history"][1:], mb["history"][1:], strict=True):
        for key in (
            "reward",
            "grad_norm",
            "length",
        ):  # per-segment means; token means are weighted by segment
            if key in ra["train"]:
                assert ra["train"][key] == pytest.approx(rb["train"][key], rel=1e-4), key


@requires_java
@pytest.mark.slow
def test_a_two_process_run_resumed_on_one_process_ends_with_the_uninterrupted_weights(tmp_path):
    """The data order depends on (seed, epoch) only and the saved state is the global one: a 2-process run stopped
    after its first epoch and resumed with 1 process ends where the uninterrupted 2-process run ends."""
    data = write_tiny_dataset(tmp_path / "data")
    argv = tiny_argv(
        data, tmp_path / "log", "EXP", "--rl_warmstart_epochs", "2", "--one_by_one_starts_at", "1"
    )
    argv += ["--dout_p", "0", "--B", "2"]

    def run(launcher: list[str], exp: str, *extra: str) -> None:
        command = [*launcher, str(REPO / "main.py"), *(exp if a == "EXP" else a for a in argv), *extra]
        done = subprocess.run(command, env=ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    runs = tmp_path / "log" / "train_rl_cap"
    run(TORCHRUN, "full", "--epoch_num", "2")
    run(TORCHRUN, "stopped", "--epoch_num", "1")
    run(
        [sys.executable],
        "stopped",
        "--resume",
        str(runs / "stopped" / "checkpoints" / "last"),
        "--epoch_num",
        "2",
    )
    a, b = (
        torch.load(runs / r / "checkpoints" / "last" / AGENT_FILE, weights_only=True)
        for r in ("full", "stopped")
    )
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-5
    ma, mb = without_times(runs / "full" / "metrics.json"), without_times(runs / "stopped" / "metrics.json")
    assert ma["history"][-1]["val"] == mb["history"][-1]["val"]


def test_a_global_batch_that_does_not_split_is_a_one_line_error(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    argv = tiny_argv(data, tmp_path / "log", "odd", "--B", "3", "--epoch_num", "1")
    done = subprocess.run([*TORCHRUN, str(REPO / "main.py"), *argv], env=ENV, capture_output=True, text=True)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("main.py: error:")]
    assert errors and all(
        "--B 3 is the global batch and does not split over 2 processes" in e for e in errors
    )
    assert not (tmp_path / "log").exists()


def test_a_procedure_that_runs_in_one_process_refuses_torchrun(tmp_path):
    argv = ["--procedure", "export_ranking", "--log_dir", str(tmp_path / "log"), "--no-progress"]
    done = subprocess.run([*TORCHRUN, str(REPO / "main.py"), *argv], env=ENV, capture_output=True, text=True)
    assert done.returncode != 0
    assert re.search(
        r"main.py: error: rank [01]: --procedure export_ranking runs in one process \(torchrun", done.stderr
    )
    assert not (tmp_path / "log").exists()


MACHINERY = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
import torch
from epoch_loops.training import Optimisation, optimiser_step
from utilities import distributed
from utilities.errors import TrainingError

with distributed.process_group("cpu", timeout_s=20):
    rank = distributed.rank()
    model = torch.nn.Linear(3, 1)
    opt = Optimisation("test", torch.optim.SGD(model.parameters(), lr=0.1), None)
    if {scenario!r} == "kill" and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    loss = model(torch.ones(1, 3)).sum() * (float("nan") if rank == 1 else 1.0)
    try:
        optimiser_step(opt, loss, "epoch 0, batch 3")
    except TrainingError as e:
        print(f"rank {{rank}} stopped: {{e}}", flush=True)
        sys.exit(2)
"""


def run_machinery(tmp_path: Path, scenario: str) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "machinery.py"
    script.write_text(textwrap.dedent(MACHINERY.format(repo=str(REPO), scenario=scenario)))
    started = time.monotonic()
    done = subprocess.run([*TORCHRUN, str(script)], env=ENV, capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - started


def test_a_nan_on_rank_1_stops_every_rank_naming_the_step_and_the_rank(tmp_path):
    done, _ = run_machinery(tmp_path, "nan")
    assert done.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} stopped: test: non-finite loss" in done.stdout
    # the two ranks print concurrently into one pipe: their lines may interleave, so count messages, not lines
    assert done.stdout.count("stopped: test: non-finite loss") == 2
    assert done.stdout.count("at optimiser step 1 on rank 1 (epoch 0, batch 3)") == 2


def test_a_killed_rank_ends_the_job_non_zero_within_60_s(tmp_path):
    done, seconds = run_machinery(tmp_path, "kill")
    assert done.returncode != 0
    assert seconds < 60
