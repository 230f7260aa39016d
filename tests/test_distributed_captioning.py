"""torchrun (gloo, CPU) for the captioning procedures besides `train_rl_cap` (tests/test_distributed.py): the
segment critic and the proposal generator train the weights of one process on 2 with the same validation numbers,
each held-out caption / val_1 video is scored once, only rank 0 writes, and a 2-process critic run resumed on 1
process ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets.captioning.activitynet import read_captions_csv
from datasets.demo import ensure_demo_dataset
from datasets.vocabulary import Vocabulary
from epoch_loops.captioning import train as captioning
from epoch_loops.captioning.proposals import build_generator
from main import build_parser
from model.captioning.bmhrl import SegmentCritic
from tests.conftest import REPO
from tests.test_captioning import sample_checkpoint, tiny_argv, write_tiny_dataset
from tests.test_distributed import ENV, TORCHRUN
from tests.test_precision import VOCAB
from tests.test_train_critic import CAPTIONS, SMALL, argv_for, write_csv
from tests.test_train_prop import SMALL_HEADS, train_prop_argv
from utilities.config import Config, config_from_argv

CRITIC_B = [
    "--B",
    "2",
    "--inf_B_coeff",
    "1",
]  # 7 training captions: the last global batch has 1 (a stand-in on rank 1)


def launch(launcher: list[str], argv: list[str]) -> None:
    done = subprocess.run([*launcher, str(REPO / "main.py"), *argv], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def critic_argv(tmp_path: Path, exp: str, *extra: str) -> list[str]:
    train = write_csv(tmp_path / "train.csv", CAPTIONS[:7])
    heldout = write_csv(tmp_path / "heldout.csv", CAPTIONS[:3])  # 3 captions over 2 ranks: an uneven split
    return argv_for(train, heldout, tmp_path, *SMALL, *CRITIC_B, "--exp_name", exp, "--no-progress", *extra)


def critic_run(tmp_path: Path, exp: str) -> tuple[dict, dict]:
    run = tmp_path / "log" / "train_critic" / exp
    state = torch.load(run / "checkpoints" / "train_critic_last.pt", weights_only=False)
    return state["model"], json.loads((run / "metrics.json").read_text())


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow  # two runs and a torchrun start: ~20 s (tests/test_distributed.py keeps one such test fast)
def test_train_critic_on_two_processes_trains_the_weights_of_one(tmp_path):
    launch([sys.executable], critic_argv(tmp_path, "one", "--epoch_num", "2"))
    launch(TORCHRUN, critic_argv(tmp_path, "two", "--epoch_num", "2"))
    (wa, ma), (wb, mb) = critic_run(tmp_path, "one"), critic_run(tmp_path, "two")
    assert max_difference(wa, wb) <= 1e-5
    for ra, rb in zip(ma["epochs"], mb["epochs"], strict=True):
        for key in ("precision", "recall", "f1", "heldout_scored"):
            assert ra[key] == rb[key], key
        for key in ("train_loss", "heldout_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5), key
    # Each held-out caption is scored once (a DistributedSampler would pad the 3 to 4).
    heldout_tokens = ma["heldout_tokens"]
    assert all(r["heldout_scored"] == {"captions": 3, "tokens": heldout_tokens} for r in mb["epochs"])
    runs = tmp_path / "log" / "train_critic"
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == ["train_critic"]
    files = [
        sorted(str(p.relative_to(runs / r)) for p in (runs / r).rglob("*") if "events" not in p.name)
        for r in ("one", "two")
    ]
    assert files[0] == files[1]


@pytest.mark.slow
def test_a_two_process_critic_run_resumed_on_one_process_ends_with_the_uninterrupted_weights(tmp_path):
    launch(TORCHRUN, critic_argv(tmp_path, "full", "--epoch_num", "2"))
    launch(TORCHRUN, critic_argv(tmp_path, "stopped", "--epoch_num", "1"))
    last = tmp_path / "log" / "train_critic" / "stopped" / "checkpoints" / "train_critic_last.pt"
    launch([sys.executable], critic_argv(tmp_path, "stopped", "--epoch_num", "2", "--resume", str(last)))
    (wa, ma), (wb, mb) = critic_run(tmp_path, "full"), critic_run(tmp_path, "stopped")
    assert max_difference(wa, wb) <= 1e-5
    assert [r["f1"] for r in ma["epochs"]] == [r["f1"] for r in mb["epochs"]]


@pytest.mark.slow
def test_train_prop_on_two_processes_trains_the_weights_of_one(tmp_path):
    """--B 8 over 2 processes (4 videos each, padded as the global batch), dropout off; val_1's 7 videos are
    split 3 + 4 and each is proposed for once."""
    argv = [
        *train_prop_argv(tmp_path, n_train=24, n_val=7),
        "--dout_p",
        "0",
        "--epoch_num",
        "2",
        "--no-progress",
    ]
    launch([sys.executable], [*argv, "--exp_name", "one"])
    launch(TORCHRUN, [*argv, "--exp_name", "two"])
    runs = tmp_path / "log" / "train_prop"
    a, b = (
        torch.load(runs / r / "checkpoints" / "train_prop_last.pt", weights_only=False)
        for r in ("one", "two")
    )
    assert max_difference(a["model"], b["model"]) <= 1e-5
    ma, mb = (json.loads((runs / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert [e["val_1"] for e in ma["epochs"]] == [e["val_1"] for e in mb["epochs"]]
    for ea, eb in zip(ma["epochs"], mb["epochs"], strict=True):
        assert ea["train_loss"] == pytest.approx(eb["train_loss"], rel=1e-5)
    proposed = json.loads((runs / "two" / "prop_results_val_1_e2_maxprop100.json").read_text())["results"]
    val_videos = {
        line.split("\t")[0] for line in (tmp_path / "demo" / "val_1.csv").read_text().splitlines()[1:]
    }
    assert sorted(proposed) == sorted(val_videos)


def dropouts(*modules: torch.nn.Module) -> list[float]:
    return [m.p for module in modules for m in module.modules() if isinstance(m, torch.nn.Dropout)]


def test_dout_p_0_switches_off_every_dropout_of_the_agent_and_the_proposal_generator(tmp_path):
    """The 1-vs-N equivalence runs (and the demo's saved configs run with --dout_p 0) rely on this; the segment
    critic has no dropout."""
    data = write_tiny_dataset(tmp_path / "data")
    for dout_p, expected in (("0.1", 0.1), ("0", 0.0)):
        cfg = Config(**vars(build_parser().parse_args(tiny_argv(data, tmp_path, "d", "--dout_p", dout_p))))
        agents = captioning.new_agents(cfg, Vocabulary(VOCAB))
        found = dropouts(agents.agent, agents.worker_value, agents.manager_value)
        assert found and set(found) == {expected}
    sample_checkpoint(tmp_path / "agent")
    demo = ensure_demo_dataset(tmp_path / "demo", seed=0, n_train=8, n_val=2)
    argv = ["--procedure", "train_prop", "--rl_pretrained_model_dir", str(tmp_path / "agent"), *SMALL_HEADS]
    argv += ["--train_meta_path", demo.config_overrides()["train_meta_path"], "--device", "cpu"]
    segments = read_captions_csv(demo.config_overrides()["train_meta_path"]).segments
    for dout_p, expected in (("0.1", 0.1), ("0", 0.0)):
        cfg = config_from_argv(build_parser(), [*argv, "--dout_p", dout_p])
        found = dropouts(build_generator(cfg, segments))
        assert found and set(found) == {expected}
    assert dropouts(SegmentCritic()) == []
