"""torchrun (gloo, CPU) for LR²PPO's stages: with dropout off, 2 processes train the weights of 1 on the same global
batches and report the same validation numbers, each clip / comparison scored once; a 2-process run resumes on 1
process. Also: `--xit_dropout 0` switches off every dropout, PPO's prefetched features are those of a direct read,
and a PPO loss under bf16 is within 2 % of fp32."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from datasets.demo import ensure_letor_demo, ensure_ranking_demo
from datasets.loader import prefetched
from datasets.ranking.lrmovienet import ClipFeatures, LabelBatch, RewardTripletDataset, read_clip_list
from epoch_loops.ranking.ppo import minibatch_features, objective_loss
from main import build_parser, main
from model.ranking.scorer import LabelRankingConfig
from tests.conftest import REPO
from tests.test_distributed import ENV, TORCHRUN
from tests.test_letor_transfer import SMALL as LETOR_SMALL
from tests.test_ranking_training import SIZES, demo, ppo_setup, stage_argv, trained  # noqa: F401 (fixtures)
from utilities.checkpoint import load_checkpoint
from utilities.config import config_from_argv

COMMON = ["--xit_dropout", "0", "--learning_rate", "1e-3", "--report_steps", "3", "--frame_order", "random"]
STAGES = {
    # 17 clips in global batches of 8: 8, 8, 1 (rank 1 steps on a stand-in); 7 dev clips split 4 / 3
    "pointwise": ["--batch_size", "8", "--epochs_num", "2", "--max_tags", "10"],
    "reward": ["--batch_size", "8", "--epochs_num", "1", "--reward_val_triplets", "5"],
}
PPO = ["--max_tags", "2", "--batch_size", "16", "--update_timesteps", "2", "--ppo_epochs", "2"]
PPO += ["--minibatch_size", "6", "--epochs_num", "1"]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_ranking")
    return ensure_ranking_demo(root / "demo", seed=0, n_source=17, n_target=8, n_val=7, n_test=8)


def on_one_and_two(demo_paths, log_dir: Path, procedure: str, *flags: str) -> dict[str, Path]:
    """An LRMovieNet stage on 1 process and on 2: the two run directories."""
    return one_and_two(
        log_dir, procedure, procedure, stage_argv(demo_paths, log_dir, procedure, "x", *COMMON, *flags)
    )


def one_and_two(log_dir: Path, procedure: str, name: str, argv: list[str]) -> dict[str, Path]:
    """`argv` under torchrun with 2 processes, then on 1 (in this one), as runs `<name>_two` and `<name>_one` of
    `log_dir` (the later --exp_name / --log_dir win): the two run directories."""
    runs = {}
    for n in ("two", "one"):
        full = [*argv, "--exp_name", f"{name}_{n}", "--log_dir", str(log_dir)]
        if n == "one":
            assert main(full) == 0
        else:
            done = subprocess.run(
                [*TORCHRUN, str(REPO / "main.py"), *full], env=ENV, capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr[-3000:]
        runs[n] = log_dir / procedure / f"{name}_{n}"
    return runs


def max_weight_difference(a: Path, b: Path) -> float:
    """The largest difference between two checkpoints' weights."""
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def assert_same_run(runs: dict[str, Path]) -> None:
    """The same weights (≤ 1e-5), steps and validation numbers (identical; the reward margin to 1e-6) on 1 and
    2 processes."""
    one, two = (runs[n] / "checkpoints" / "last.pt" for n in ("one", "two"))
    assert load_checkpoint(one)["step"] == load_checkpoint(two)["step"]
    assert max_weight_difference(one, two) <= 1e-5
    assert without_margins(metrics(runs["one"])) == without_margins(metrics(runs["two"]))
    one_means, two_means = (training_means(metrics(runs[n])) for n in ("one", "two"))
    assert one_means == pytest.approx(two_means, rel=1e-5, abs=1e-6) and one_means
    for split in ("dev", "test"):
        if "margin" in metrics(runs["one"])[split]:
            one, two = (metrics(runs[n])[split]["margin"] for n in ("one", "two"))
            assert one == pytest.approx(two, abs=1e-6)


def without_margins(numbers: dict) -> dict:
    """The metrics but the reward stage's mean margin and the history's training means (means of raw losses and
    rewards: they follow the weights' last-bit differences, ≤ 1e-5, compared by `assert_same_run`); accuracies,
    NDCG and counts do not."""
    kept = {k: v for k, v in numbers.items() if k != "margin"}
    if "history" in kept:
        kept["history"] = [
            without_margins({k: v for k, v in report.items() if k != "train"}) for report in kept["history"]
        ]
    return {k: without_margins(v) if isinstance(v, dict) else v for k, v in kept.items()}


def training_means(numbers: dict) -> list[float]:
    return [value for report in numbers.get("history", []) for value in report["train"].values()]


@pytest.fixture(scope="module")
def pointwise_runs(small_demo, tmp_path_factory):
    return on_one_and_two(small_demo, tmp_path_factory.mktemp("log"), "pointwise", *STAGES["pointwise"])


def test_pointwise_on_two_processes_trains_the_weights_of_one_and_scores_each_clip_once(pointwise_runs):
    assert_same_run(pointwise_runs)
    assert load_checkpoint(pointwise_runs["two"] / "checkpoints" / "last.pt")["step"] == 2 * 3
    for run in pointwise_runs.values():
        assert metrics(run)["dev"]["clips"] == 7 and metrics(run)["test"]["clips"] == 8
    assert sorted(p.name for p in pointwise_runs["two"].parent.iterdir()) == [
        "pointwise_one",
        "pointwise_two",
    ]


@pytest.fixture(scope="module")
def stage_checkpoints(small_demo, pointwise_runs, tmp_path_factory) -> dict:
    """The reward stage on 1 and 2 processes; PPO starts from the 1-process stage checkpoints."""
    log_dir = tmp_path_factory.mktemp("log")
    reward = on_one_and_two(small_demo, log_dir, "reward", *STAGES["reward"])
    return {
        "log": log_dir,
        "reward": reward,
        "ppo_start": [
            "--pretrained_model_path",
            str(pointwise_runs["one"] / "checkpoints" / "best.pt"),
            "--reward_model_path",
            str(reward["one"] / "checkpoints" / "best.pt"),
        ],
    }


@pytest.mark.slow
def test_reward_on_two_processes_trains_the_weights_of_one_and_counts_each_comparison_once(
    small_demo, stage_checkpoints
):
    runs = stage_checkpoints["reward"]
    assert_same_run(runs)
    for split, path in (("dev", small_demo.val), ("test", small_demo.test)):
        features = ClipFeatures(small_demo.features_h5, seq_length=8, dim=32)
        comparisons = len(RewardTripletDataset(read_clip_list(path), features, 4, 0, 5))
        assert metrics(runs["two"])[split]["comparisons"] == comparisons > 0


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["clip", "lr2ppo"])
def test_ppo_on_two_processes_trains_the_weights_of_one(small_demo, stage_checkpoints, objective):
    """Rollouts of 32 pairs in minibatches of 6 (3 per rank, the last one 1 per rank), 2 PPO epochs each: the
    same Plackett–Luce orders, advantages and minibatches on either number of processes."""
    flags = [*PPO, "--ppo_objective", objective, *stage_checkpoints["ppo_start"]]
    runs = on_one_and_two(small_demo, stage_checkpoints["log"] / objective, "ppo", *flags)
    assert_same_run(runs)
    assert metrics(runs["two"])["dev"]["clips"] == 7


STOP_AFTER_FIRST_CHECKPOINT = """
import sys
from epoch_loops import training
from main import main

real = training.Saver.save


def save_then_stop(self, name, *args, **kwargs):
    real(self, name, *args, **kwargs)
    if name == "last.pt":
        raise KeyboardInterrupt  # every rank, after the checkpoint of the first epoch's last step


training.Saver.save = save_then_stop
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_two_process_run_stopped_after_its_first_epoch_resumes_on_one_process(
    small_demo, pointwise_runs, tmp_path
):
    """3 steps per epoch, a checkpoint every 3: the 2-process run stops after epoch 1; one process finishes it
    with the weights and numbers of the uninterrupted 2-process run."""
    script = tmp_path / "stopping_main.py"
    script.write_text(STOP_AFTER_FIRST_CHECKPOINT)
    argv = stage_argv(small_demo, tmp_path, "pointwise", "cut", *COMMON, *STAGES["pointwise"])
    stopped = subprocess.run([*TORCHRUN, str(script), *argv], env=ENV, capture_output=True, text=True)
    assert stopped.returncode != 0
    last = tmp_path / "pointwise" / "cut" / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["step"] == 3
    assert main(["--procedure", "pointwise", "--resume", str(last), "--num_workers", "0"]) == 0
    assert max_weight_difference(last, pointwise_runs["two"] / "checkpoints" / "last.pt") <= 1e-5
    resumed, uninterrupted = metrics(last.parents[1]), metrics(pointwise_runs["two"])
    assert without_margins(resumed) == without_margins(uninterrupted)
    assert training_means(resumed) == pytest.approx(training_means(uninterrupted), rel=1e-5, abs=1e-6)


# --- dropout off, prefetching, bf16 --------------------------------------------------------------------------------


def test_xit_dropout_0_switches_off_every_dropout_of_the_ranking_models():
    """Built from the flags with --xit_dropout 0: no dropout module with p > 0 (the default has some), and two
    train-mode forward passes give the same scores (no functional dropout either)."""
    flags = ["--procedure", "pointwise", *SIZES]
    default = LabelRankingConfig.from_config(config_from_argv(build_parser(), flags))
    off = LabelRankingConfig.from_config(config_from_argv(build_parser(), [*flags, "--xit_dropout", "0"]))

    def dropouts(model: torch.nn.Module) -> list[float]:
        return [m.p for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]

    assert any(dropouts(default.build_scorer())) and any(dropouts(default.build_reward_model()))
    torch.manual_seed(0)
    frames, text = torch.randn(3, 4, 32), torch.randn(3, 2, 8, 32)  # 2 labels: a PPO state
    for model in (off.build_scorer(), off.build_reward_model(), off.build_alignment_model(16, 24)):
        assert not any(dropouts(model))
        if not hasattr(model, "text_proj3"):  # the scorer and the reward model on clips
            model.train()
            with torch.no_grad():
                assert torch.equal(model(frames, text), model(frames, text))


def test_prefetched_minibatch_features_are_those_of_a_direct_read(demo, trained, monkeypatch):  # noqa: F811
    cfg, models, dataset, rollout = ppo_setup(demo, trained, "lr2ppo")
    parts = [rollout.select(torch.arange(i, i + 3)) for i in range(0, 6, 3)]
    read = list(prefetched((minibatch_features(dataset, p) for p in parts), pin=False))
    for part, batch in zip(parts, read, strict=True):
        direct = minibatch_features(dataset, part)
        assert all(
            torch.equal(getattr(batch, f), getattr(direct, f)) for f in ("frames", "text", "labels", "mask")
        )
        assert torch.equal(
            objective_loss(cfg, models, part, batch)[0], objective_loss(cfg, models, part, direct)[0]
        )
    pinned = []
    monkeypatch.setattr(LabelBatch, "pin_memory", lambda self: pinned.append(self) or self)
    assert (
        len(list(prefetched((minibatch_features(dataset, p) for p in parts), pin=False))) == 2 and not pinned
    )
    assert len(list(prefetched((minibatch_features(dataset, p) for p in parts), pin=True))) == 2
    assert len(pinned) == 2  # pin is requested where the run's device is CUDA (train_ppo: device type cuda)


def test_a_ppo_loss_under_bf16_is_within_2_percent_of_fp32(demo, trained):  # noqa: F811
    for objective in ("lr2ppo", "clip"):
        cfg, models, dataset, rollout = ppo_setup(demo, trained, objective)
        if objective == "clip":
            rollout.advantage = torch.linspace(-1, 1, len(rollout))
        batch = minibatch_features(dataset, rollout)
        fp32 = float(objective_loss(cfg, models, rollout, batch)[0].detach())
        models.amp = "bf16"
        bf16 = float(objective_loss(cfg, models, rollout, batch)[0].detach())
        assert bf16 == pytest.approx(fp32, rel=0.02) and bf16 != fp32


@pytest.mark.parametrize(
    ("procedure", "extra"), [("pointwise", "--max_tags 10"), ("reward", "--reward_val_triplets 5")]
)
def test_stages_1_and_2_under_bf16_have_the_fp32_first_loss_within_2_percent(
    demo,  # noqa: F811
    tmp_path,
    procedure,
    extra,
):
    """`--amp bf16` reaches stages 1 and 2: the first step's loss (reported after step 1) moves, by < 2 %."""
    first = {}
    for amp in ("none", "bf16"):
        argv = stage_argv(demo, tmp_path, procedure, amp, "--learning_rate", "1e-3", "--batch_size", "8")
        assert main([*argv, "--epochs_num", "1", "--report_steps", "1", "--amp", amp, *extra.split()]) == 0
        first[amp] = metrics(tmp_path / procedure / amp)["history"][0]["train"]["loss"]
    assert first["bf16"] == pytest.approx(first["none"], rel=0.02) and first["bf16"] != first["none"]


def test_the_demos_ranking_stage_configs_split_over_two_processes():
    """The demo's saved stage configs are run as they are on 1 process and under torchrun with 2: every global
    batch flag must be even."""
    from epoch_loops.ranking.demo import LETOR_STAGES, OBJECTIVES, STAGES

    for settings in (*STAGES.values(), *OBJECTIVES.values(), *LETOR_STAGES.values()):
        for flag in ("batch_size", "minibatch_size"):
            assert settings.get(flag, 2) % 2 == 0, (flag, settings)


@pytest.mark.slow
def test_letor_stages_on_two_processes_train_the_weights_of_one(tmp_path):
    """The alignment step and stage 1 of the LETOR transfer on generated folds: the 2-process run packs the
    feature cache (rank 0 first, rank 1 reads it), then both take the steps of one process."""
    folds = ensure_letor_demo(tmp_path / "demo", queries=(6, 4, 3, 3), align_target_queries=3)
    argv = [*LETOR_SMALL, "--source_dir", str(folds.source_dir), "--target_dir", str(folds.target_dir)]
    argv += ["--letor_cache_dir", str(tmp_path / "cache"), "--epochs_num", "2", "--batch_size", "4"]
    argv += ["--report_steps", "2", "--xit_dropout", "0", "--learning_rate", "1e-3"]
    align = one_and_two(
        tmp_path,
        "pointwise",
        "align",
        ["--procedure", "pointwise", "--task", "letor_align", *argv, "--limit_rows", "50"],
    )
    assert_same_run(align)
    aligned = ["--alignment_model_path", str(align["one"] / "checkpoints" / "best.pt")]
    first = one_and_two(
        tmp_path, "pointwise", "first", ["--procedure", "pointwise", "--task", "letor", *argv, *aligned]
    )
    assert_same_run(first)
    assert metrics(first["two"])["test"]["clips"] == 3 and metrics(first["two"])["dev"]["clips"] == 3
