"""LR²PPO's procedures through main(): dry runs at paper size, the three stages on tiny demo data, checkpoints
(ours ↔ released), `eval --task ranking` from a checkpoint, NaN handling and exact resume, and the PPO
objectives' invariants (detached advantage weight, frozen reward model, ratio 1 before the first step)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from datasets.demo import ensure_ranking_demo
from datasets.ranking.lrmovienet import PPOPairDataset, read_clip_list
from epoch_loops.ranking import stages as ranking
from epoch_loops.ranking.checkpoints import RankingWeights, model_sizes, read_ranking_weights
from epoch_loops.ranking.ppo import (
    build_models,
    collect,
    minibatch_features,
    objective_loss,
    stage_sizes,
    update,
)
from epoch_loops.ranking.stages import open_features
from epoch_loops.training import Optimisation, adamw, linear_schedule
from main import build_parser, main
from model.ranking.losses import clip_ppo_loss, lr2ppo_loss
from utilities.checkpoint import load_checkpoint
from utilities.config import config_from_argv
from utilities.errors import InputError, TrainingError

SIZES = ["--seq_length", "8", "--max_imgs", "4", "--visual_feat_dim", "32", "--text_feat_dim", "32"]
SIZES += ["--feedforward_size", "32", "--xit_heads", "2"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranking_train")
    return ensure_ranking_demo(root / "demo", seed=0, n_source=24, n_target=16, n_val=8, n_test=8)


def stage_argv(demo, log_dir: Path, procedure: str, name: str, *extra: str) -> list[str]:
    train = {"pointwise": demo.first_stage, "reward": demo.pairs, "ppo": demo.first_second_stage}[procedure]
    return [
        "--procedure", procedure, "--exp_name", name, "--log_dir", str(log_dir), "--device", "cpu",
        "--num_workers", "0", "--features_h5", str(demo.features_h5), "--train_path", str(train),
        "--dev_path", str(demo.val), "--test_path", str(demo.test), *SIZES, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    """Stages 1 and 2, one short epoch each: their best checkpoints."""
    log_dir = tmp_path_factory.mktemp("log")
    common = ["--learning_rate", "1e-3", "--batch_size", "8", "--epochs_num", "1", "--report_steps", "3"]
    assert main(stage_argv(demo, log_dir, "pointwise", "p", *common, "--max_tags", "10")) == 0
    assert main(stage_argv(demo, log_dir, "reward", "r", *common, "--reward_val_triplets", "5")) == 0
    return {
        "log": log_dir,
        "pointwise": log_dir / "pointwise" / "p" / "checkpoints" / "best.pt",
        "reward": log_dir / "reward" / "r" / "checkpoints" / "best.pt",
    }


def test_dry_runs_print_the_paper_size_parameter_counts(tmp_path, capsys):
    for procedure, count in (("pointwise", 519070465), ("reward", 526164481)):
        assert (
            main(["--procedure", procedure, "--dry_run", "--log_dir", str(tmp_path), "--device", "cpu"]) == 0
        )
        assert f"trainable parameters: {count}\n" in capsys.readouterr().out
    assert main(["--procedure", "ppo", "--dry_run", "--log_dir", str(tmp_path), "--device", "cpu"]) == 0
    assert f"trainable parameters: {519070465 + 526164481}\n" in capsys.readouterr().out
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


def test_stages_write_dev_and_test_metrics_and_checkpoints(trained):
    for stage, metric in (("pointwise", "NDCG@all"), ("reward", "pair_accuracy")):
        run = trained[stage].parents[1]
        metrics = json.loads((run / "metrics.json").read_text())
        assert set(metrics) >= {"dev", "test", "selected_step"} and 0 <= metrics["test"][metric] <= 1
        assert read_ranking_weights(trained[stage]).kind == stage
    assert load_checkpoint(trained["pointwise"].parent / "last.pt")["step"] == 3  # 24 clips / batch 8
    pointwise = json.loads((trained["pointwise"].parents[1] / "metrics.json").read_text())
    assert pointwise["test"]["clips"] == 8


@pytest.mark.parametrize("objective", ["lr2ppo", "clip"])
def test_ppo_runs_from_the_stage_checkpoints(demo, trained, tmp_path, objective):
    argv = stage_argv(demo, tmp_path, "ppo", objective, "--ppo_objective", objective, "--max_tags", "2")
    argv += [
        "--pretrained_model_path",
        str(trained["pointwise"]),
        "--reward_model_path",
        str(trained["reward"]),
    ]
    argv += ["--batch_size", "16", "--update_timesteps", "2", "--ppo_epochs", "2", "--minibatch_size", "12"]
    argv += ["--epochs_num", "1", "--learning_rate", "1e-4"]
    assert main(argv) == 0
    run = tmp_path / "ppo" / objective
    metrics = json.loads((run / "metrics.json").read_text())
    assert (
        metrics["updates"] == 3 and metrics["objective"] == objective
    )  # 40 clips × 2 pairs: rollouts 32, 32, 16
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["step"] == 2 * (3 + 3 + 2)  # minibatches of 12 per rollout, 2 PPO epochs each
    weights = read_ranking_weights(run / "checkpoints" / "best.pt")
    assert weights.kind == "ppo" and {k.split(".")[0] for k in weights.state} == {"actor", "critic"}


def ranking_flags(*flags: str):
    return config_from_argv(build_parser(), ["--procedure", "eval", "--task", "ranking", *flags])


def test_a_released_file_runs_with_the_original_attention_and_ours_with_its_saved_mode(caplog):
    released = RankingWeights("pointwise", {}, "pointwise.bin")
    with caplog.at_level("INFO"):
        assert model_sizes(ranking_flags(), released).compat_xit_attention
    assert "pointwise.bin: the original's layout (no config of ours)" in caplog.text
    assert not model_sizes(ranking_flags("--no-compat_xit_attention"), released).compat_xit_attention

    ours = RankingWeights("pointwise", {}, "best.pt", {"seq_length": 8, "compat_xit_attention": True})
    sizes = model_sizes(ranking_flags("--xit_dropout", "0.3"), ours)
    assert (sizes.seq_length, sizes.compat_xit_attention, sizes.xit_dropout) == (8, True, 0.3)
    with pytest.raises(InputError, match=r"--compat_xit_attention False: best\.pt was trained with .* True"):
        model_sizes(ranking_flags("--no-compat_xit_attention"), ours)
    with pytest.raises(InputError, match=r"--seq_length 196: best\.pt was trained with seq_length 8"):
        model_sizes(ranking_flags("--seq_length", "196"), ours)


def test_ppo_refuses_stage_checkpoints_of_different_settings():
    ours = RankingWeights("pointwise", {}, "best.pt", {"seq_length": 8})
    released = RankingWeights("reward", {}, "reward.bin")
    with pytest.raises(InputError) as err:
        stage_sizes(ranking_flags("--seq_length", "8"), ours, released)
    assert str(err.value) == (
        "--pretrained_model_path best.pt and --reward_model_path reward.bin were trained at different settings: "
        "compat_xit_attention False vs True"
    )


def test_ppo_builds_its_models_at_the_stage_checkpoints_sizes_not_the_flags(trained):
    cfg = ranking_flags("--pretrained_model_path", str(trained["pointwise"]))
    cfg.reward_model_path, cfg.ppo_objective, cfg.device = str(trained["reward"]), "lr2ppo", "cpu"
    models = build_models(cfg)  # the flags hold the paper's sizes; the checkpoints the tiny ones
    assert (models.sizes.seq_length, models.sizes.visual_feat_dim) == (8, 32)
    assert models.actor.seq_length == 8 and not models.actor.compat_xit_attention


def test_stages_started_from_a_released_file_train_with_its_attention_and_record_it(demo, trained, tmp_path):
    """A pointwise or reward run started from a released `.bin` (no config of ours) builds its model with the
    original's attention, and its own checkpoints say so (so PPO and eval rebuild it the same way)."""
    released = tmp_path / "pointwise.bin"
    state = load_checkpoint(trained["pointwise"])["model"]
    torch.save(state, released)
    common = ["--learning_rate", "1e-3", "--batch_size", "8", "--epochs_num", "1", "--report_steps", "50"]
    for stage in ("pointwise", "reward"):
        extra = ["--max_tags", "10"] if stage == "pointwise" else ["--reward_val_triplets", "5"]
        argv = stage_argv(demo, tmp_path, stage, "from_bin", *common, *extra)
        assert main([*argv, "--pretrained_model_path", str(released)]) == 0
        saved = load_checkpoint(tmp_path / stage / "from_bin" / "checkpoints" / "best.pt")["config"]
        assert saved["compat_xit_attention"] is True, stage


def ppo_setup(demo, trained, objective: str):
    cfg = config_from_argv(
        build_parser(), stage_argv(demo, Path("unused"), "ppo", "x", "--ppo_objective", objective)
    )
    cfg.pretrained_model_path, cfg.reward_model_path = str(trained["pointwise"]), str(trained["reward"])
    cfg.batch_size, cfg.minibatch_size, cfg.ppo_epochs = 8, 8, 1
    models = build_models(cfg)
    dataset = PPOPairDataset(read_clip_list(demo.first_second_stage), open_features(cfg), 4, 2, "random", 0)
    batch = next(iter(ranking.loader(cfg, dataset, shuffle=True)))
    rollout = collect(cfg, models, batch, torch.Generator().manual_seed(0))
    return cfg, models, dataset, rollout


def test_rollout_buffer_holds_ids_and_scalars_only(demo, trained):
    *_, rollout = ppo_setup(demo, trained, "clip")
    tensors = {k: v for k, v in vars(rollout).items() if isinstance(v, torch.Tensor)}
    assert tensors and all(t.numel() <= 2 * len(rollout) for t in tensors.values())  # per pair: ≤ 2 numbers
    feature_bytes = 4 * 2 * (8 + 4) * 32  # two labels' tokens and frames, float32, at these tiny sizes
    assert rollout.nbytes() / len(rollout) < feature_bytes / 10
    assert len(rollout) == 8 and isinstance(rollout.clip_ids[0], str)


def test_clip_objective_starts_at_ratio_one_with_nothing_clipped(demo, trained):
    cfg, models, dataset, rollout = ppo_setup(demo, trained, "clip")
    rollout.advantage = torch.randn(len(rollout))
    loss, stats = objective_loss(cfg, models, rollout, minibatch_features(dataset, rollout))
    assert torch.isfinite(loss)
    assert stats["clip_fraction"] == 0 and abs(float(stats["approx_kl"])) < 1e-6
    assert float(stats["kl_ref"]) >= 0 and float(stats["kl_ref"]) < 1e-6  # the actor is still the reference


def test_ppo_update_leaves_the_reward_model_untouched(demo, trained):
    cfg, models, dataset, rollout = ppo_setup(demo, trained, "lr2ppo")
    before = {k: v.clone() for k, v in models.reward.state_dict().items()}
    actor_before = {k: v.clone() for k, v in models.actor.state_dict().items()}
    optimizer = adamw([(models.actor, 1e-3), (models.critic, 1e-3)], 0.01)
    opt = Optimisation("ppo", optimizer, None, scheduler=linear_schedule(optimizer, 1, 0.0))
    update(cfg, models, dataset, rollout, opt, 0, {})
    assert opt.step == 1
    assert all(p.grad is None and not p.requires_grad for p in models.reward.parameters())
    assert all(torch.equal(before[k], v) for k, v in models.reward.state_dict().items())
    assert any(not torch.equal(actor_before[k], v) for k, v in models.actor.state_dict().items())


@pytest.mark.parametrize("objective", ["clip", "lr2ppo"])
def test_ppo_leaves_the_score_shifting_biases_alone_and_they_change_no_ranking(demo, trained, objective):
    """The biases that shift every label's score alike change no PL probability or pair gap: PPO does not train
    them (Adam would turn their rounding-noise gradient into lr-sized steps)."""
    cfg, models, dataset, rollout = ppo_setup(demo, trained, objective)
    shift = models.actor.shift_parameters()
    before = [p.clone() for p in shift]
    batch = dataset.fetch(rollout.clip_ids, rollout.labels.tolist(), rollout.frame_keys.tolist())
    scores = models.actor(batch.frames, batch.text).detach()
    with torch.no_grad():
        for p in shift:
            p.add_(0.75)
    shifted = models.actor(batch.frames, batch.text).detach()
    gap = shifted - scores
    assert torch.allclose(gap, gap[:1, :1].expand_as(gap), atol=1e-5) and float(gap.abs().min()) > 0.1
    with torch.no_grad():
        for p, b in zip(shift, before, strict=True):
            p.copy_(b)
    optimizer = adamw([(models.actor, 1e-3), (models.critic, 1e-3)], 0.01)
    update(cfg, models, dataset, rollout, Optimisation("ppo", optimizer, None), 0, {})
    assert all(not p.requires_grad and torch.equal(p, b) for p, b in zip(shift, before, strict=True))


def test_lr2ppo_weights_each_hinge_by_the_detached_advantage():
    torch.manual_seed(0)
    scores = torch.randn(6, 2, requires_grad=True)
    scores_old = scores.detach() + 0.3 * torch.randn(6, 2)
    order = torch.sort(scores_old, dim=1, descending=True).indices
    reward, value_old = torch.randn(6), torch.randn(6)
    value = value_old.clone().requires_grad_(True)
    kw = {"kl_weight": 0.5, "entropy_weight": 0.0, "value_clip": 0.5, "advantage_threshold": -0.1}
    loss, _ = lr2ppo_loss(scores, scores_old, order, reward, value, value_old, rank_margin=5.0, **kw)
    (grad,) = torch.autograd.grad(loss, scores)

    # independent: the same terms with the advantage computed apart as a constant
    p_old = scores_old.softmax(-1)
    kl = (p_old * (p_old.log() - scores.log_softmax(-1))).sum(-1)
    with torch.no_grad():
        advantage = reward - 0.5 * kl - value_old
    keep = advantage >= -0.1
    first = torch.where(keep, order[:, 0], order[:, 1])
    second = torch.where(keep, order[:, 1], order[:, 0])
    hinge = torch.relu(5.0 - (scores[torch.arange(6), first] - scores[torch.arange(6), second]))
    expected_loss = (advantage.abs() * hinge).mean() + 0.5 * kl.mean()
    (expected,) = torch.autograd.grad(expected_loss, scores, retain_graph=True)
    assert torch.allclose(grad, expected, atol=1e-6)
    (leaky,) = torch.autograd.grad(
        ((reward - 0.5 * kl - value_old).abs() * hinge).mean() + 0.5 * kl.mean(), scores
    )
    assert not torch.allclose(grad, leaky, atol=1e-4), "an undetached |A| would change the gradient"


def test_clip_loss_matches_a_straightforward_pair_implementation():
    torch.manual_seed(1)
    scores = torch.randn(5, 2, requires_grad=True)
    old = scores.detach() + 0.2 * torch.randn(5, 2)
    ref = scores.detach() + 0.2 * torch.randn(5, 2)
    order = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [1, 0]])
    advantage, reward, value_old = torch.randn(5), torch.randn(5), torch.randn(5)
    value = value_old + 0.1

    def log_p(s):  # a pair's Plackett–Luce: the first-ranked label's softmax probability
        return s.log_softmax(-1).gather(1, order[:, :1]).squeeze(1)

    loss, stats = clip_ppo_loss(
        scores, order, log_p(old), advantage, reward, value, value_old, ref,
        temperature=1.0, eps_clip=0.2, kl_weight=0.1, entropy_weight=0.01, value_clip=0.5,
    )  # fmt: skip
    ratio = (log_p(scores) - log_p(old)).exp()
    surrogate = torch.max(-advantage * ratio, -advantage * ratio.clamp(0.8, 1.2)).mean()
    d = log_p(ref) - log_p(scores)
    entropy = -(scores.softmax(-1) * scores.log_softmax(-1)).sum(-1).mean()
    value_loss = ((value - reward) ** 2).mean()  # within the clip range
    expected = surrogate + 0.1 * (d.exp() - 1 - d).mean() - 0.01 * entropy + value_loss
    assert torch.allclose(loss, expected, atol=1e-6)
    assert float(stats["kl_ref"]) >= 0
    assert float(stats["clip_fraction"]) == float(((ratio - 1).abs() > 0.2).float().mean())


def test_export_to_released_and_back_and_eval_from_either(demo, trained, tmp_path, capsys):
    released, ours = tmp_path / "pointwise.bin", tmp_path / "ours.pt"
    base = ["--log_dir", str(tmp_path / "log"), "--device", "cpu"]
    assert main(["--procedure", "export_ranking", *base, "--pretrained_model_path", str(trained["pointwise"]),
                 "--export_path", str(released)]) == 0  # fmt: skip
    plain = torch.load(released, weights_only=True)
    original = read_ranking_weights(trained["pointwise"]).state
    assert set(plain) == set(original) and all(torch.equal(plain[k], original[k]) for k in plain)
    assert "out_layer.fc1.weight" in plain and "xit.0.0.0.fn.1.queries.weight" in plain
    assert main(["--procedure", "export_ranking", *base, *SIZES, "--pretrained_model_path", str(released),
                 "--export_path", str(ours), "--export_format", "ours"]) == 0  # fmt: skip
    assert read_ranking_weights(ours).saved_config["seq_length"] == 8

    results = []
    compat = [
        "--no-compat_xit_attention"
    ]  # the released layout runs with the original's attention by default
    for name, ckpt, sizes in (("ours", trained["pointwise"], []), ("bin", released, [*SIZES, *compat])):
        metrics_out, cases_out = tmp_path / f"{name}_m.json", tmp_path / f"{name}_cases.json"
        argv = [
            "--procedure",
            "eval",
            "--task",
            "ranking",
            *base,
            "--pretrained_model_path",
            str(ckpt),
            *sizes,
        ]
        argv += ["--features_h5", str(demo.features_h5), "--test_path", str(demo.test)]
        assert main([*argv, "--metrics_out", str(metrics_out), "--cases_out", str(cases_out)]) == 0
        results.append((json.loads(metrics_out.read_text()), json.loads(cases_out.read_text())))
    assert results[0] == results[1], "the released layout scores exactly as our checkpoint"

    metrics, cases = results[0]
    assert list(metrics) == ["NDCG@1", "NDCG@3", "NDCG@5", "NDCG@10", "NDCG@20", "NDCG@all", "clips"]
    clips = read_clip_list(demo.test).clips
    assert [case["id"] for case in cases] == [c.id for c in clips] and metrics["clips"] == len(clips)
    for case, clip in zip(cases, clips, strict=True):
        assert list(case) == ["id", "scores", "ndcg", "predict"] and len(case["scores"]) == len(clip.tags)
        assert list(case["ndcg"]) == list(metrics)[:-1]
        assert [list(p) for p in case["predict"]] == [["tag", "target", "score"]] * len(clip.tags)
        by_tag = dict(zip(clip.tags, zip(case["scores"], clip.targets, strict=True), strict=True))
        assert all(by_tag[p["tag"]] == (p["score"], p["target"]) for p in case["predict"])
        ranked = [p["score"] for p in case["predict"]]
        assert ranked == sorted(ranked, reverse=True)
    mean = sum(c["ndcg"]["NDCG@all"] for c in cases) / len(cases)
    assert metrics["NDCG@all"] == pytest.approx(mean)


def test_a_reward_checkpoint_is_refused_as_a_scorer(demo, trained, tmp_path, capsys):
    argv = ["--procedure", "eval", "--task", "ranking", "--log_dir", str(tmp_path), "--device", "cpu"]
    argv += ["--pretrained_model_path", str(trained["reward"]), "--features_h5", str(demo.features_h5)]
    assert main([*argv, "--test_path", str(demo.test)]) == 2
    err = capsys.readouterr().err
    assert "reward-model checkpoint" in err and err.count("\n") == 1


class NanOnSecondClip(torch.nn.Module):
    """A scorer whose scores are finite except for the second clip of each batch."""

    def forward(self, frames, text):
        scores = text.mean((2, 3))
        scores[1, 0] = float("nan")
        return scores


def test_non_finite_scores_stop_dev_selection_naming_the_clip(demo):
    cfg = config_from_argv(build_parser(), stage_argv(demo, Path("unused"), "pointwise", "x"))
    dataset = ranking.graded_splits(cfg, open_features(cfg))["dev"]
    second = dataset.clips.clips[1]
    with pytest.raises(
        TrainingError, match=rf"clip {second.id}: the model gives 1 of its {len(second.tags)} labels"
    ):
        ranking.ndcg(cfg, NanOnSecondClip(), dataset)


def test_eval_of_a_checkpoint_with_nan_weights_writes_nothing_and_names_the_clip(
    demo, trained, tmp_path, capsys
):
    state = load_checkpoint(trained["pointwise"])
    state["model"]["out_layer.fc1.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    metrics_out, cases_out = tmp_path / "m.json", tmp_path / "cases.json"
    argv = ["--procedure", "eval", "--task", "ranking", "--log_dir", str(tmp_path / "log"), "--device", "cpu"]
    argv += ["--pretrained_model_path", str(tmp_path / "nan.pt"), "--features_h5", str(demo.features_h5)]
    argv += ["--test_path", str(demo.test), "--metrics_out", str(metrics_out), "--cases_out", str(cases_out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    first = read_clip_list(demo.test).clips[0]
    assert err.count("\n") == 1 and f"clip {first.id}: the model gives" in err and "non-finite score" in err
    assert not metrics_out.exists() and not cases_out.exists()


def test_an_error_in_a_loader_worker_is_the_same_one_line_as_without_workers(demo, tmp_path, capsys):
    features = tmp_path / "feat.h5"
    shutil.copy(demo.features_h5, features)
    clip_id = read_clip_list(demo.first_stage).clips[5].id
    with h5py.File(features, "a") as f:
        f[f"{clip_id}/img_emb"][0, 1, 0] = np.inf
    errors = {}
    for workers in ("0", "2"):
        argv = stage_argv(
            demo, tmp_path, "pointwise", f"w{workers}", "--batch_size", "8", "--epochs_num", "1"
        )
        assert main([*argv, "--features_h5", str(features), "--num_workers", workers]) == 2
        errors[workers] = capsys.readouterr().err
    assert (
        errors["2"]
        == errors["0"]
        == f"main.py: error: {features}: clip {clip_id} img_emb: holds NaN or inf\n"
    )


def test_nan_stops_naming_the_step_and_resume_reproduces_the_uninterrupted_run(
    demo, tmp_path, capsys, monkeypatch
):
    common = ["--learning_rate", "1e-3", "--batch_size", "8", "--epochs_num", "2", "--report_steps", "2"]
    common += ["--max_tags", "10", "--frame_order", "random"]
    assert main(stage_argv(demo, tmp_path, "pointwise", "full", *common)) == 0
    full = json.loads((tmp_path / "pointwise" / "full" / "metrics.json").read_text())

    real_loss, calls = ranking.pointwise_batch_loss, []

    def failing_loss(model, batch):
        calls.append(1)
        loss, stats = real_loss(model, batch)
        return (loss * float("nan") if len(calls) == 5 else loss), stats

    monkeypatch.setattr(ranking, "pointwise_batch_loss", failing_loss)
    assert main(stage_argv(demo, tmp_path, "pointwise", "cut", *common)) == 2
    err = capsys.readouterr().err
    last = tmp_path / "pointwise" / "cut" / "checkpoints" / "last.pt"
    assert "pointwise: non-finite loss (nan) at optimiser step 5 (epoch 2)" in err and err.count("\n") == 1
    assert f"the last good checkpoint is {last}" in err
    state = load_checkpoint(last)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())

    monkeypatch.setattr(ranking, "pointwise_batch_loss", real_loss)
    assert main([*stage_argv(demo, tmp_path, "pointwise", "cut", *common), "--resume", str(last)]) == 0
    resumed = json.loads((tmp_path / "pointwise" / "cut" / "metrics.json").read_text())
    assert resumed == full


@pytest.mark.slow
def test_demo_ppo_beats_the_pointwise_model_on_the_target_domain(tmp_path):
    """Issue 11's acceptance on the demo (about a minute): reward accuracy ≥ 0.7 on held-out target comparisons,
    and both PPO objectives above the source-trained scorer on the target test split (LRMovieNet and LETOR)."""
    from epoch_loops.ranking.demo import ranking_demo
    from utilities.run_dir import RunDir

    argv = ["--procedure", "demo", "--demo_dir", str(tmp_path / "demo"), "--log_dir", str(tmp_path / "log")]
    cfg = config_from_argv(build_parser(), [*argv, "--device", "cpu", "--exp_name", "run"])
    with RunDir.open(cfg) as run:
        metrics = ranking_demo(cfg, run)
    assert set(metrics) == {
        *("ranking/pointwise", "ranking/reward", "ranking/ppo_lr2ppo", "ranking/ppo_clip"),
        *("letor/pointwise", "letor/ppo_lr2ppo", "letor/ppo_clip", "letor/lightgbm_target"),
    }
    for objective in ("lr2ppo", "clip"):  # the LETOR transfer part, too
        assert metrics[f"letor/ppo_{objective}"]["NDCG@all"] > metrics["letor/pointwise"]["NDCG@all"]
    assert metrics["ranking/reward"]["pair_accuracy"] >= 0.7
    before = metrics["ranking/pointwise"]["NDCG@all"]
    assert metrics["ranking/ppo_lr2ppo"]["NDCG@all"] > before
    assert metrics["ranking/ppo_clip"]["NDCG@all"] > before
    assert set(metrics["ranking/ppo_clip"]) >= {
        "NDCG@1",
        "NDCG@3",
        "NDCG@5",
        "NDCG@10",
        "NDCG@20",
        "NDCG@all",
    }


def test_ctrl_c_names_the_checkpoint_and_resume_keeps_the_runs_settings_directory_and_cpu_rng(
    demo, tmp_path, capsys, monkeypatch
):
    """Ctrl-C: one line with the resume command, exit 130. `--resume` alone continues the run in its own
    directory with its saved settings (another --exp_name is ignored, --device/--num_workers may differ), loads
    the checkpoint on the CPU whatever the device, and equals the uninterrupted run; changing --epochs_num (the
    linear schedule's length) is refused naming both values."""
    common = ["--learning_rate", "1e-3", "--batch_size", "8", "--epochs_num", "2", "--report_steps", "2"]
    common += ["--max_tags", "10"]
    assert main(stage_argv(demo, tmp_path, "pointwise", "full", *common)) == 0
    full = json.loads((tmp_path / "pointwise" / "full" / "metrics.json").read_text())
    capsys.readouterr()

    real_loss, calls = ranking.pointwise_batch_loss, []

    def interrupted_loss(model, batch):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_loss(model, batch)

    monkeypatch.setattr(ranking, "pointwise_batch_loss", interrupted_loss)
    assert main(stage_argv(demo, tmp_path, "pointwise", "cut", *common)) == 130
    err = capsys.readouterr().err
    last = tmp_path / "pointwise" / "cut" / "checkpoints" / "last.pt"
    assert err.count("\n") == 1 and f"--procedure pointwise --resume {last}" in err
    monkeypatch.setattr(ranking, "pointwise_batch_loss", real_loss)

    resume = ["--procedure", "pointwise", "--resume", str(last), "--num_workers", "0"]
    assert main([*resume, "--epochs_num", "3"]) == 2
    err = capsys.readouterr().err
    assert (
        f"--resume {last}: --epochs_num 3 differs from the run's 2; a resumed run keeps its settings" in err
    )

    real_load, map_locations = torch.load, []

    def recording_load(*args, **kwargs):
        map_locations.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    assert (
        main([*resume, "--device", "cpu:0", "--exp_name", "elsewhere", "--log_dir", str(tmp_path / "x")]) == 0
    )
    assert map_locations and set(map_locations) == {"cpu"}
    assert not (tmp_path / "x").exists()
    resumed = json.loads((tmp_path / "pointwise" / "cut" / "metrics.json").read_text())
    assert resumed == full


def test_ctrl_c_before_the_first_checkpoint_says_so_and_what_to_delete(demo, tmp_path, capsys, monkeypatch):
    def interrupted_loss(model, batch):
        raise KeyboardInterrupt

    monkeypatch.setattr(ranking, "pointwise_batch_loss", interrupted_loss)
    argv = stage_argv(demo, tmp_path, "pointwise", "early", "--batch_size", "8", "--epochs_num", "1")
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to resume" in err and "--resume" not in err
    run = tmp_path / "pointwise" / "early"
    run.mkdir(parents=True, exist_ok=True)  # as a run stopped after its first write, before a checkpoint
    (run / "config.json").write_text("{}")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"holds no checkpoint to resume; delete it (rm -r {run})" in err and "--resume" not in err
