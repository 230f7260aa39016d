"""`--procedure demo`: the data pipeline and the evaluator end to end on the built-in demo data."""

from __future__ import annotations

import json

import pytest

from datasets.captioning.activitynet import read_captions_csv
from epoch_loops.demo import DEMO_RL
from main import main
from tests.conftest import requires_java
from tests.test_watch import events


@pytest.mark.slow
@requires_java
def test_demo_agent_beats_both_baselines(tmp_path, capsys):
    """Issue 9's acceptance: the agent after the warm start is ≥ 15 METEOR points (×100) above the most frequent
    caption and not below the nearest neighbour (mean of val_1 and val_2)."""
    argv = ["--procedure", "demo", "--demo_dir", str(tmp_path / "demo"), "--log_dir", str(tmp_path / "log")]
    out_json = tmp_path / "m.json"
    assert main([*argv, "--exp_name", "run", "--num_workers", "0", "--metrics_out", str(out_json)]) == 0
    run = tmp_path / "log" / "demo" / "run"
    metrics = json.loads(out_json.read_text())
    assert metrics == json.loads((run / "metrics.json").read_text())
    nn, constant = metrics["mean/nearest_neighbour"]["METEOR"], metrics["mean/most_frequent"]["METEOR"]
    agent = metrics["mean/warm_start"]["METEOR"]
    assert nn > constant + 0.05, "the demo features must carry the captions' content"
    assert agent >= constant + 0.15 and agent >= nn, (agent, nn, constant)
    assert agent == pytest.approx(
        (metrics["val_1/warm_start"]["METEOR"] + metrics["val_2/warm_start"]["METEOR"]) / 2
    )
    assert metrics["val_1/nearest_neighbour"]["Recall"] == 1.0
    for objective in ("biased_kl", "scst"):  # issue 10: RL from the warm start with each objective
        rl_meteor = metrics[f"mean/rl_{objective}"]["METEOR"]
        assert rl_meteor >= agent - 0.005, (objective, rl_meteor, agent)
        rewards = metrics[f"rl_reward/{objective}"]
        epochs = DEMO_RL[objective]["epoch_num"]
        assert len(rewards) == epochs and rewards[-1] > rewards[0], (objective, rewards)
        last = epochs - 1
        assert (run / f"agent_rl_{objective}" / f"captioning_results_val_1_e{last}.json").is_file()

    # issue 17: the proposal generator beats the uniform grid; the agent captions its own proposals
    assert metrics["proposals/learned"]["F1"] > metrics["proposals/uniform"]["F1"]
    assert set(metrics["dense/learned_proposals"]) == {"METEOR", "SODA_c"}
    assert (run / "proposals" / "checkpoints" / "best_prop_model.pt").is_file()

    submission = json.loads((run / "captioning_results_val_1_nearest_neighbour.json").read_text())
    segments = read_captions_csv(tmp_path / "demo" / "val_1.csv").segments
    first = segments[0]
    assert submission["results"][first.video_id][0]["timestamp"] == [first.start, first.end]
    assert sum(len(v) for v in submission["results"].values()) == len(segments)
    assert json.loads((run / "config.json").read_text())["train_meta_path"].endswith("train.csv")
    assert (run / "agent" / "captioning_results_val_2_e7.json").is_file()
    table = capsys.readouterr().out.split("mean METEOR")[-1]
    assert all(name in table for name in ("most_frequent", "nearest_neighbour", "warm_start"))

    # issue 19: every stage run of the demo can be watched: per-step scalars, validation samples, train.log
    for stage, samples in (("agent", "val_1/captions"), ("agent_rl_scst", "val_1/captions"), ("proposals", None),
                           ("ranking/pointwise", "pointwise/dev_rankings"), ("ranking/ppo_clip", "ppo/dev_rankings")):  # fmt: skip
        folder = run / stage
        accumulator = events(folder)
        assert accumulator.Scalars("train/loss") and accumulator.Scalars("train/grad_norm"), stage
        if samples:
            assert accumulator.Tensors(f"{samples}/text_summary"), stage
        assert "best: " in (folder / "train.log").read_text(), stage


def test_demo_dry_run_counts_the_agent(tmp_path, capsys):
    argv = ["--procedure", "demo", "--demo_dir", str(tmp_path / "demo"), "--log_dir", str(tmp_path / "log")]
    assert main([*argv, "--exp_name", "dry", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "vocabulary size: " in out and "trainable parameters: " in out and "METEOR" not in out
    assert not (tmp_path / "log" / "demo" / "dry").exists()


def test_demo_without_working_java_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMRL_JAVA", str(tmp_path / "no_java_here"))
    argv = ["--procedure", "demo", "--demo_dir", str(tmp_path / "demo"), "--log_dir", str(tmp_path / "log")]
    assert main([*argv, "--num_workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("main.py: error: Java executable") and err.count("\n") == 1
