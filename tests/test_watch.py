"""Issue 19 items 4-5: runs you can watch (per-step scalars, validation samples, train.log, the best line) and
`--procedure plot`. One module fixture trains a demo-like set of tiny runs: the captioner's warm start and an
RL epoch from it, and the three ranking stages."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from datasets.demo import ensure_ranking_demo
from main import main
from tests.test_captioning import tiny_argv, write_tiny_dataset
from tests.test_ranking_training import stage_argv
from utilities.checkpoint import load_checkpoint

CAPTION_STEPS_PER_EPOCH = 3  # 12 training segments, --B 4
RANKING = ["--learning_rate", "1e-3", "--batch_size", "8", "--report_steps", "3", "--log_every", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The runs' folders and the console of each (captured through the same stdout the copy tees)."""
    if shutil.which("java") is None:
        pytest.skip("Java is not installed (METEOR validates the captioner)")
    root = tmp_path_factory.mktemp("watch")
    log = root / "log"
    captioning = write_tiny_dataset(root / "captions")
    console = {}
    capture = pytest.MonkeyPatch()

    def run(name: str, argv: list[str]) -> str:
        import io
        import sys

        out, root = io.StringIO(), logging.getLogger()
        capture.setattr(sys, "stdout", out)
        level = root.level
        root.setLevel(logging.INFO)  # as setup_logging outside pytest (setLevel: the loggers' caches follow)
        try:
            assert main(argv) == 0
        finally:
            root.setLevel(level)
            capture.undo()
        console[name] = out.getvalue()
        return console[name]

    warm = tiny_argv(captioning, log, "warm", "--rl_warmstart_epochs", "2", "--epoch_num", "2")
    run("warm", [*warm, "--one_by_one_starts_at", "1", "--log_every", "2"])
    rl = tiny_argv(
        captioning, log, "rl", "--rl_warmstart_epochs", "0", "--epoch_num", "1", "--log_every", "1"
    )
    rl += ["--rl_pretrained_model_dir", str(log / "train_rl_cap" / "warm" / "checkpoints" / "last")]
    run("rl", [*rl, "--one_by_one_starts_at", "5", "--rl_samples", "2", "--rl_reward", "cider"])

    demo = ensure_ranking_demo(root / "ranking", seed=0, n_source=24, n_target=16, n_val=8, n_test=8)
    run(
        "pointwise",
        stage_argv(demo, log, "pointwise", "p", *RANKING, "--epochs_num", "2", "--max_tags", "10"),
    )
    run(
        "reward",
        stage_argv(demo, log, "reward", "r", *RANKING, "--epochs_num", "1", "--reward_val_triplets", "5"),
    )
    ppo = stage_argv(demo, log, "ppo", "clip", *RANKING, "--epochs_num", "1", "--ppo_objective", "clip")
    ppo += ["--pretrained_model_path", str(log / "pointwise" / "p" / "checkpoints" / "best.pt")]
    ppo += ["--reward_model_path", str(log / "reward" / "r" / "checkpoints" / "best.pt")]
    run(
        "ppo",
        [*ppo, "--max_tags", "2", "--batch_size", "16", "--update_timesteps", "1", "--minibatch_size", "8"],
    )
    folders = {
        "warm": log / "train_rl_cap" / "warm",
        "rl": log / "train_rl_cap" / "rl",
        "pointwise": log / "pointwise" / "p",
        "reward": log / "reward" / "r",
        "ppo": log / "ppo" / "clip",
    }
    return {"folders": folders, "console": console, "root": root}


def events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def steps_of(folder: Path) -> int:
    """The optimiser steps a run took, from its resumable checkpoint."""
    last = folder / "checkpoints" / "last"
    state = load_checkpoint(
        last / "training_state.pt" if last.is_dir() else folder / "checkpoints" / "last.pt"
    )
    return state["step"]


@pytest.mark.parametrize(
    ("name", "every", "extra"),
    [
        ("warm", 2, set()),
        ("rl", 1, {"reward", "entropy"}),
        ("pointwise", 2, set()),
        ("reward", 2, {"accuracy"}),
        ("ppo", 2, {"reward", "approx_kl", "clip_fraction", "entropy"}),
    ],
)
def test_per_step_scalars_every_log_every_steps(runs, name, every, extra):
    folder = runs["folders"][name]
    steps = steps_of(folder)
    if name == "warm":
        assert steps == 2 * CAPTION_STEPS_PER_EPOCH
    scalars = events(folder)
    tags = set(scalars.Tags()["scalars"])
    for tag in {"loss", "grad_norm", "lr", "steps_per_s", *extra}:
        assert f"train/{tag}" in tags, (name, sorted(tags))
        points = scalars.Scalars(f"train/{tag}")
        assert [p.step for p in points] == list(range(every, steps + 1, every)), (name, tag)
        assert all(math.isfinite(p.value) for p in points)
    assert all(p.value > 0 for p in scalars.Scalars("train/steps_per_s"))


def test_the_step_loss_is_the_mean_of_its_window(runs):
    """warm start: the per-epoch loss is the token-weighted mean of the steps; the logged windows of 2 steps
    are plain means, so their mean over an epoch of 3 steps cannot be checked exactly, but their range can."""
    scalars = events(runs["folders"]["warm"])
    losses = [p.value for p in scalars.Scalars("train/loss")]
    history = json.loads((runs["folders"]["warm"] / "metrics.json").read_text())["history"]
    epoch_losses = [r["train"]["loss"] for r in history]
    assert len(losses) == 3
    assert min(epoch_losses) * 0.5 < losses[-1] < max(epoch_losses) * 1.5
    lr = scalars.Scalars("train/lr")
    assert all(p.value == pytest.approx(1e-3) for p in lr)  # --rl_cap_warmstart_lr of tiny_argv


def test_off_with_log_every_0(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    argv = tiny_argv(data, tmp_path / "log", "quiet", "--epoch_num", "1", "--one_by_one_starts_at", "5")
    assert main([*argv, "--log_every", "0"]) == 0
    tags = events(tmp_path / "log" / "train_rl_cap" / "quiet").Tags()["scalars"]
    assert not [t for t in tags if t.startswith("train/")] and "epoch/loss" in tags


def test_validation_samples_as_text(runs):
    warm = events(runs["folders"]["warm"])
    text = warm.Tensors("val_1/captions/text_summary")
    assert [t.step for t in text] == [1]
    shown = text[0].tensor_proto.string_val[0].decode()
    assert shown.count("predicted: ") == 3 and shown.count("reference: ") == 3
    first = shown.split("\n\n")[0]
    submission = json.loads((runs["folders"]["warm"] / "captioning_results_val_1_e1.json").read_text())
    video, prediction = next(iter(submission["results"].items()))
    assert first.startswith(f"**{video} [") and f"predicted: {prediction[0]['sentence']} |" in first
    for name, tag in (
        ("pointwise", "pointwise/dev_rankings/text_summary"),
        ("ppo", "ppo/dev_rankings/text_summary"),
    ):
        rankings = events(runs["folders"][name]).Tensors(tag)
        assert rankings, name
        assert rankings[-1].tensor_proto.string_val[0].decode().count("predicted ") == 3


@pytest.mark.parametrize("name", ["warm", "rl", "pointwise", "reward", "ppo"])
def test_train_log_holds_the_console_and_the_last_line_names_the_best_checkpoint(runs, name):
    folder, console = runs["folders"][name], runs["console"][name]
    saved = (folder / "train.log").read_text()
    printed = [line for line in console.splitlines() if line.strip()]
    assert printed and all(line in saved for line in printed)  # every printed line, in order
    assert saved.index(printed[0]) < saved.index(printed[-1])
    assert f"INFO utilities.run_dir: run directory: {folder}" in saved  # the log records too
    last = printed[-1]
    assert last.startswith("best: ") and last.count(", ") >= 2, last
    checkpoint = Path(last.rsplit(", ", 1)[1])
    assert checkpoint.exists() and checkpoint.parent == folder / "checkpoints", last
    if name == "warm":
        best = json.loads((folder / "metrics.json").read_text())
        meteor = 100 * best["best"]["val_1"]["METEOR"]
        assert last == f"best: epoch 1, METEOR {meteor:.2f} (val_1), {folder / 'checkpoints' / 'E_1'}"


def test_plot_draws_the_runs_curves(runs):
    folders, out = runs["folders"], runs["root"] / "curves.png"
    argv = ["--procedure", "plot", "--log_dir", str(runs["root"] / "log"), "--out", str(out), "--runs"]
    assert main([*argv, *(str(folders[n]) for n in ("warm", "rl", "pointwise", "ppo"))]) == 0
    image = imread(out)
    # panels: METEOR, training loss per epoch, training reward per epoch, NDCG@all, training loss and reward
    # per step: two rows of three, 5.2 × 3.6 inches each at 100 dpi
    assert image.shape[:2] == (720, 1560)
    background = (image[..., :3] > 0.98).all(-1)
    assert 0.03 < 1 - background.mean() < 0.6, 1 - background.mean()


def test_plot_of_a_folder_of_runs_draws_its_stage_runs(runs, tmp_path):
    """A demo's folder holds no curve of its own: its stage runs (sub-folders) are drawn."""
    out = tmp_path / "demo.png"
    argv = ["--procedure", "plot", "--log_dir", str(tmp_path), "--out", str(out)]
    assert main([*argv, "--runs", str(runs["root"] / "log" / "train_rl_cap")]) == 0
    assert imread(out).shape[:2] == (360, 1560)  # METEOR, loss, reward


def test_plot_of_a_folder_without_metrics_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["--procedure", "plot", "--log_dir", str(tmp_path), "--runs", str(tmp_path / "empty")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"main.py: error: --runs {tmp_path / 'empty'}: has no metrics.json (give the folder of a training run, e.g. log/train_rl_cap/<exp>, or a demo run)\n"
    )
    assert main([*argv[:-1], str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"main.py: error: --runs {tmp_path / 'missing'}: no such folder\n"


def test_progress_off_a_tty_is_a_periodic_log_line(monkeypatch, caplog):
    """Long loops (1-by-1 captioning of a split, METEOR of a split) in a log file: a line every `every` s."""
    from utilities import log

    monkeypatch.setattr(log, "_progress_enabled", True)
    monkeypatch.setattr(log.sys.stderr, "isatty", lambda: False, raising=False)
    with caplog.at_level(logging.INFO, logger="utilities.log"):
        assert list(log.progress(range(4), "METEOR of val_1", unit="pair", every=0)) == [0, 1, 2, 3]
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == [
        f"METEOR of val_1: {i}/4 ({100 * i / 4:.0f}%) pair" for i in (1, 2, 3, 4)
    ]
    caplog.clear()
    assert list(log.progress(range(4), "x", every=3600)) == [0, 1, 2, 3] and not caplog.records
    monkeypatch.setattr(log, "_progress_enabled", False)
    assert list(log.progress(range(4), "x", every=0)) == [0, 1, 2, 3] and not caplog.records


def test_plot_does_not_load_torch(runs, tmp_path):
    """Registered `uses_torch=False`: it runs where only the metrics files are (and starts in a second)."""
    import subprocess
    import sys

    argv = ["--procedure", "plot", "--log_dir", str(tmp_path), "--out", str(tmp_path / "c.png")]
    argv += ["--runs", str(runs["folders"]["pointwise"])]
    code = f"import sys; from main import main; assert main({argv!r}) == 0; assert 'torch' not in sys.modules"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert imread(tmp_path / "c.png").shape[:2] == (360, 1040)  # two panels: NDCG@all (dev), training loss
