"""The LR²PPO part of `--procedure demo`: the three stages on the built-in LRMovieNet look-alike.

Stage 1 learns the source vocabulary's graded labels; stage 2 learns the target vocabulary's preference pairs;
stage 3 adapts the stage-1 scorer with the stage-2 reward model, once per PPO objective. The scorer never sees a
graded target label, so the target-domain test NDCG before (stage 1) and after PPO shows the domain adaptation
the paper is about. Small sizes (32-d features, 8 tokens, 4 frames), a few CPU minutes in all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets.demo import ensure_letor_demo, ensure_ranking_demo
from epoch_loops.ranking import letor
from epoch_loops.ranking.ppo import ppo
from epoch_loops.ranking.stages import pointwise, reward
from utilities.config import Config
from utilities.run_dir import RunDir
from utilities.seeding import seed_everything

MODEL = {"feedforward_size": 64, "xit_heads": 4, "xit_dropout": 0.1, "scorer_head": "flattened"}
COMMON = {"num_workers": 0, "warmup": 0.1, "ranking_weight_decay": 0.01, "grad_clip": 1.0, "resume": None}
STAGES: dict[str, dict[str, Any]] = {
    "pointwise": {
        "batch_size": 8,
        "epochs_num": 6,
        "learning_rate": 1e-3,
        "report_steps": 25,
        "max_tags": 10,
    },
    "reward": {
        "batch_size": 32,
        "epochs_num": 4,
        "learning_rate": 1e-3,
        "report_steps": 85,
        "margin": 1.0,
        "reward_val_triplets": 20,  # 1,200 held-out comparisons per split
    },
    "ppo": {
        "batch_size": 32,
        "epochs_num": 3,
        "max_tags": 8,  # pairs per clip per epoch
        "update_timesteps": 10,
        "learning_rate": 1e-4,
        "critic_learning_rate": 1e-3,
        "kl_div_loss_weight": 0.001,
        "entropy_weight": 0.001,
        "value_clip": 0.5,
    },
}
OBJECTIVES: dict[str, dict[str, Any]] = {
    "lr2ppo": {"ppo_objective": "lr2ppo", "ppo_epochs": 1},
    "clip": {"ppo_objective": "clip", "ppo_epochs": 4, "minibatch_size": 64, "pl_temperature": 1.0},
}


# The LETOR transfer part (generated MSLR-WEB10K / MQ2008 look-alikes of the real widths): small model sizes.
LETOR_MODEL = {"visual_feat_dim": 32, "feedforward_size": 64, "xit_heads": 4, "xit_dropout": 0.1}
LETOR_STAGES: dict[str, dict[str, Any]] = {
    "align": {"batch_size": 8, "epochs_num": 8, "learning_rate": 1e-3, "report_steps": 20},
    "pointwise": {"batch_size": 8, "epochs_num": 8, "learning_rate": 1e-3, "report_steps": 20},
    "reward": {
        "batch_size": 32,
        "epochs_num": 4,
        "max_tags": 10,  # comparisons per query per epoch
        "learning_rate": 1e-3,
        "report_steps": 20,
        "margin": 1.0,
        "reward_val_triplets": 10,
    },
    "ppo": {**STAGES["ppo"], "max_tags": 8, "update_timesteps": 5},  # max_tags: pairs per query per epoch
}
LETOR_REPORTED = ("NDCG@10", "NDCG@all")


def ranking_demo(cfg: Config, run: RunDir) -> dict[str, dict]:
    """Run the stages in `<run>/ranking/<stage>/`; return the demo's metrics (target-domain test split)."""
    paths = ensure_ranking_demo(Path(f"{cfg.demo_dir}_ranking"), seed=0)

    def stage_config(stage: str, **extra: Any) -> Config:
        settings = {**cfg.to_dict(), **MODEL, **COMMON, **STAGES["ppo" if stage.startswith("ppo") else stage]}
        settings.update(paths.config_overrides("ppo" if stage.startswith("ppo") else stage))
        settings["text_feat_dim"] = paths.visual_feat_dim  # the demo's text and frame features share a width
        return Config(**{**settings, **extra, "procedure": stage, "metrics_out": None, "exp_name": stage})

    def run_stage(name: str, fn, stage_cfg: Config) -> dict:
        seed_everything(stage_cfg.seed)
        with RunDir(run.path / "ranking" / name, stage_cfg) as stage_run:
            return fn(stage_cfg, stage_run)

    if cfg.dry_run:
        print(f"ranking demo data: {paths.root}")
        return {}
    first = run_stage("pointwise", pointwise, stage_config("pointwise"))
    second = run_stage("reward", reward, stage_config("reward"))
    checkpoints = {
        s: str(run.path / "ranking" / s / "checkpoints" / "best.pt") for s in ("pointwise", "reward")
    }
    after = {
        name: run_stage(
            f"ppo_{name}",
            ppo,
            stage_config(
                "ppo",
                **settings,
                pretrained_model_path=checkpoints["pointwise"],
                reward_model_path=checkpoints["reward"],
            ),
        )
        for name, settings in OBJECTIVES.items()
    }
    metrics = {
        "ranking/pointwise": first["test"],
        "ranking/reward": second["test"],
        **{f"ranking/ppo_{name}": result["test"] for name, result in after.items()},
    }
    print(f"\nLR2PPO demo, target-domain test NDCG@all (seed {cfg.seed}, data seed 0):")
    print(f"  before PPO (pointwise, source labels only): {first['test']['NDCG@all']:.4f}")
    for name, result in after.items():
        print(f"  after PPO ({name}):{' ' * (28 - len(name))}{result['test']['NDCG@all']:.4f}")
    print(
        f"  reward model pair accuracy on held-out target comparisons: {second['test']['pair_accuracy']:.4f}"
    )
    return {**metrics, **letor_demo(cfg, run)}


def letor_demo(cfg: Config, run: RunDir) -> dict[str, dict]:
    """The LETOR transfer pipeline in `<run>/letor/<stage>/`: alignment, pointwise (source), reward, PPO with
    both objectives, and LightGBM trained on the target; the target's test NDCG@10 and @all of each."""
    paths = ensure_letor_demo(Path(f"{cfg.demo_dir}_letor"), seed=0)
    if cfg.dry_run:
        print(f"LETOR demo data: {paths.root}")
        return {}
    data = {
        "source_dir": str(paths.source_dir),
        "target_dir": str(paths.target_dir),
        "letor_cache_dir": str(paths.root / "cache"),
        "source_feat_dim": paths.source_feat_dim,
        "target_feat_dim": paths.target_feat_dim,
    }

    def run_stage(name: str, fn, stage: str, **extra: Any) -> dict:
        settings = {**cfg.to_dict(), **COMMON, **LETOR_MODEL, **LETOR_STAGES[stage], **data, **extra}
        task = "letor_align" if stage == "align" else "letor"
        stage_cfg = Config(
            **{
                **settings,
                "procedure": "pointwise" if stage == "align" else stage,
                "task": task,
                "metrics_out": None,
                "exp_name": name,
            }
        )
        seed_everything(stage_cfg.seed)
        with RunDir(run.path / "letor" / name, stage_cfg) as stage_run:
            return fn(stage_cfg, stage_run)

    def best(name: str) -> str:
        return str(run.path / "letor" / name / "checkpoints" / "best.pt")

    run_stage("align", letor.align, "align")
    aligned = {"alignment_model_path": best("align")}
    results = {"pointwise": run_stage("pointwise", letor.pointwise, "pointwise", **aligned)}
    run_stage("reward", letor.reward, "reward", **aligned)
    for name, settings in OBJECTIVES.items():
        results[f"ppo_{name}"] = run_stage(
            f"ppo_{name}",
            letor.ppo,
            "ppo",
            **aligned,
            **settings,
            pretrained_model_path=best("pointwise"),
            reward_model_path=best("reward"),
        )["test"]
    results["pointwise"] = results["pointwise"]["test"]
    fold = letor.read_fold(
        Config(**{**cfg.to_dict(), **data}),
        "Fold1",
        {"source": paths.source_feat_dim, "target": paths.target_feat_dim},
    )
    results["lightgbm_target"] = letor.lightgbm_ndcg(
        fold["target", "train"], fold["target", "test"], cfg.seed, cfg.ndcg_empty_ideal
    )
    print(
        f"\nLR2PPO LETOR transfer demo, target (MQ2008 look-alike) test split (seed {cfg.seed}, data seed 0):"
    )
    print(f"  {'':34}{'  '.join(LETOR_REPORTED)}")
    for name, values in results.items():
        print(f"  {name:34}" + "  ".join(f"{values[k]:{len(k)}.4f}" for k in LETOR_REPORTED))
    return {f"letor/{name}": {k: values[k] for k in LETOR_REPORTED} for name, values in results.items()}
