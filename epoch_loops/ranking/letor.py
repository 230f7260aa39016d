"""LR²PPO's transfer experiment on LETOR: MSLR-WEB10K (source) → MQ2008 (target).

`--task letor_align` / `--task letor` select it for the usual procedures:
- `pointwise --task letor_align`: the alignment model (per-domain input MLPs + the document-vector scorer) on
  both domains' `--align_fold` training rows, SmoothL1 on the labels; selected on the target's vali split;
- `pointwise --task letor`: the scorer on the source's `--fold` training queries, every row projected by the
  alignment model (`--alignment_model_path`) when the stage starts (held in memory, no intermediate files);
- `reward --task letor`: the reward model on comparisons of source + target training queries;
- `ppo --task letor`: the scorer adapted on source + target training queries with the reward model;
- `eval --task letor`: the pinned interface: raw target rows projected by the alignment model's `text_proj`,
  scored by `--pretrained_model_path`, NDCG written to `--metrics_out`, per-query scores to `--cases_out`;
- `letor_baselines`: LightGBM lambdarank trained on the target (raw rows) and on the source (aligned vectors);
- `data_summary --task letor`: queries, documents, label histogram and width of every split of `--fold`.
Every stage selects on the target's vali split and reports the target's test split (the original used its
test split for both). They run on the stages' loops (`train_supervised`, `train_ppo`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from datasets.ranking.letor import (
    DOMAINS,
    PackedSplit,
    QueryComparisons,
    QueryLists,
    QueryPairs,
    fold_files,
    load_split,
    pack,
    read_letor,
)
from datasets.ranking.lrmovienet import LabelBatch
from epoch_loops.ranking.checkpoints import (
    actor_state,
    adopt_sizes,
    load_weights,
    model_sizes,
    read_ranking_weights,
    starting_sizes,
)
from epoch_loops.ranking.ppo import build_models, train_ppo
from epoch_loops.ranking.stages import (
    SupervisedStage,
    load_trunk,
    ndcg_evaluators,
    pointwise_stage,
    print_dry_run,
    print_trainable,
    real_labels,
    require,
    reward_stage,
    score_clips,
    train_supervised,
)
from evaluation.ranking import SELECTION_METRIC, clip_ndcg, mean_ndcg
from model.ranking.losses import pointwise_loss
from model.ranking.scorer import AlignmentModel, LabelRankingConfig, alignment_widths
from utilities import distributed
from utilities.config import Config
from utilities.errors import InputError
from utilities.files import write_json_atomic
from utilities.run_dir import RunDir, is_rank0

log = logging.getLogger(__name__)

EVAL_METRICS = ("NDCG@1", "NDCG@3", "NDCG@5", "NDCG@10", "NDCG@all")  # the pinned eval interface's keys
BRANCH = {"target": "text_proj", "source": "text_proj3"}  # the alignment model's input MLP of each domain


# --- data -------------------------------------------------------------------------------------------------------


def read_fold(cfg: Config, fold: str, widths: dict[str, int]) -> dict[tuple[str, str], PackedSplit]:
    """Every split of `fold` of both domains (`--source_dir`, `--target_dir`), raw, through the packed cache;
    `--limit_rows` cuts the training files only. Under torchrun rank 0 reads (and packs) first, the other
    ranks after it, from its cache."""
    require(cfg, "source_dir", "target_dir")
    splits = {}
    if not is_rank0():
        distributed.barrier()
    for domain in DOMAINS:
        for split, path in fold_files(getattr(cfg, f"{domain}_dir"), fold).items():
            limit = cfg.limit_rows if split == "train" else None
            splits[domain, split] = load_split(path, widths[domain], cfg.letor_cache_dir, limit)
    if is_rank0():
        distributed.barrier()
    return splits


def read_alignment(cfg: Config) -> AlignmentModel:
    """The alignment model of `--alignment_model_path` (ours or the original's `.bin`), on the device, eval mode."""
    require(cfg, "alignment_model_path")
    weights = read_ranking_weights(cfg.alignment_model_path)
    if weights.kind != "align":
        raise InputError(
            f"--alignment_model_path {weights.source}: a {weights.kind} checkpoint, not an alignment model "
            "(text_proj.*, text_proj3.*)"
        )
    model = model_sizes(cfg, weights).build_alignment_model(**alignment_widths(weights.state, weights.source))
    return load_weights(model, weights.state, weights.source).to(cfg.device).eval()


@torch.no_grad()
def project(cfg: Config, align: AlignmentModel, domain: str, split: PackedSplit) -> PackedSplit:
    """The split with every row replaced by its alignment-model projection (`text_proj`/`text_proj3`)."""
    mlp = getattr(align, BRANCH[domain])
    vectors = [
        mlp(torch.from_numpy(chunk).to(cfg.device)).float().cpu().numpy()
        for chunk in np.array_split(split.features, max(1, len(split.features) // 8192))
    ]
    return split.with_features(np.concatenate(vectors))


def projected_fold(cfg: Config, sizes: LabelRankingConfig) -> dict[tuple[str, str], PackedSplit]:
    """`--fold` of both domains read at the alignment model's widths and projected into the scorer's space."""
    align = read_alignment(cfg)
    if align.visual_feat_dim != sizes.visual_feat_dim:
        raise InputError(
            f"--alignment_model_path {cfg.alignment_model_path} projects to {align.visual_feat_dim} dimensions "
            f"but the model is {sizes.visual_feat_dim}-d (--visual_feat_dim)"
        )
    widths = {"target": align.target_feat_dim, "source": align.source_feat_dim}
    return {
        key: project(cfg, align, key[0], split) for key, split in read_fold(cfg, cfg.fold, widths).items()
    }


def target_splits(cfg: Config, data: dict[tuple[str, str], PackedSplit]) -> dict[str, QueryLists]:
    """Selection on the target's vali split, report on its test split."""
    return {
        "dev": QueryLists([("target", data["target", "vali"])]),
        "test": QueryLists([("target", data["target", "test"])]),
    }


def both_train(data: dict[tuple[str, str], PackedSplit]) -> list[tuple[str, PackedSplit]]:
    return [(domain, data[domain, "train"]) for domain in DOMAINS]


# --- the alignment step and the three stages ------------------------------------------------------------------


def _align_loss(model: nn.Module, batch: LabelBatch) -> tuple[Tensor, dict[str, Tensor]]:
    scores = model(batch.frames, batch.text, batch.from_source).float()
    return pointwise_loss(scores, batch.targets, batch.mask), {}


def align(cfg: Config, run: RunDir) -> dict[str, Any] | None:
    """`pointwise --task letor_align`: the alignment model on both domains' `--align_fold` training rows."""
    sizes = LabelRankingConfig.from_config(cfg)
    widths = {"target_feat_dim": cfg.target_feat_dim, "source_feat_dim": cfg.source_feat_dim}
    if cfg.dry_run:
        print_dry_run(lambda: sizes.build_alignment_model(**widths))
        return None
    adopt_sizes(cfg, sizes)
    data = read_fold(cfg, cfg.align_fold, {"target": cfg.target_feat_dim, "source": cfg.source_feat_dim})
    model = sizes.build_alignment_model(**widths).to(cfg.device)
    print_trainable(model)
    train = QueryLists(both_train(data), cfg.seed)
    stage = SupervisedStage(
        "align",
        model,
        train,
        _align_loss,
        real_labels,
        ndcg_evaluators(cfg, target_splits(cfg, data)),
        SELECTION_METRIC,
    )
    return train_supervised(cfg, run, stage)


def pointwise(cfg: Config, run: RunDir) -> dict[str, Any] | None:
    """`pointwise --task letor`: the scorer on the source's projected training queries (all their documents)."""
    if cfg.dry_run:
        print_dry_run(LabelRankingConfig.from_config(cfg).build_scorer)
        return None
    sizes, weights = starting_sizes(cfg)
    data = projected_fold(cfg, sizes)
    model = sizes.build_scorer()
    if weights is not None:
        load_weights(model, actor_state(weights), weights.source)
    model.to(cfg.device)
    print_trainable(model)
    train = QueryLists([("source", data["source", "train"])], cfg.seed)
    return train_supervised(cfg, run, pointwise_stage(cfg, model, train, target_splits(cfg, data)))


def reward(cfg: Config, run: RunDir) -> dict[str, Any] | None:
    """`reward --task letor`: `--max_tags` comparisons per source and target training query per epoch; pair
    accuracy on `--reward_val_triplets` fixed comparisons per target vali/test query."""
    if cfg.dry_run:
        print_dry_run(LabelRankingConfig.from_config(cfg).build_reward_model)
        return None
    sizes, weights = starting_sizes(cfg)
    data = projected_fold(cfg, sizes)
    model = sizes.build_reward_model()
    if weights is not None:
        load_trunk(model, weights)
    model.to(cfg.device)
    print_trainable(model)
    train = QueryComparisons(both_train(data), cfg.max_tags, cfg.seed)
    splits = {
        s: QueryComparisons(
            [("target", data["target", split])], cfg.reward_val_triplets, cfg.seed, fixed=True
        )
        for s, split in (("dev", "vali"), ("test", "test"))
    }
    return train_supervised(cfg, run, reward_stage(cfg, model, train, splits))


def ppo(cfg: Config, run: RunDir) -> dict[str, Any] | None:
    """`ppo --task letor`: `--max_tags` random document pairs per source and target training query per epoch."""
    if cfg.dry_run:
        sizes = LabelRankingConfig.from_config(cfg)
        print_dry_run(sizes.build_scorer, sizes.build_reward_model)
        return None
    require(cfg, "pretrained_model_path", "reward_model_path")
    models = build_models(cfg)
    adopt_sizes(cfg, models.sizes)
    print_trainable(models.actor, models.critic)
    data = projected_fold(cfg, models.sizes)
    train = QueryPairs(both_train(data), cfg.max_tags, cfg.seed)
    return train_ppo(cfg, run, models, train, target_splits(cfg, data))


# --- the pinned evaluation interface and the data summary ------------------------------------------------------


def evaluate(cfg: Config, run: RunDir) -> dict[str, float]:
    """`eval --task letor --alignment_model_path A --pretrained_model_path S --target_test_path test.txt`: every
    query of the raw target file with all its documents, projected by A's `text_proj`, scored by S (a scorer or
    a PPO checkpoint's actor; a released file runs with the original's attention). Writes the five NDCGs
    averaged over queries and, with `--cases_out`, `[{"qid", "scores" (the head's outputs, file order), "ndcg"}]`
    in file order."""
    require(cfg, "pretrained_model_path", "target_test_path")
    align = read_alignment(cfg)
    weights = read_ranking_weights(cfg.pretrained_model_path)
    sizes = model_sizes(cfg, weights)
    scorer = load_weights(sizes.build_scorer(), actor_state(weights), weights.source).to(cfg.device)
    queries = read_letor(cfg.target_test_path, align.target_feat_dim, exact_width=True)
    split = project(cfg, align, "target", pack(queries, cfg.target_test_path))
    scores = score_clips(cfg, scorer, QueryLists([("target", split)]))
    cases = []
    for query, query_scores in zip(queries, scores, strict=True):
        per_query = clip_ndcg(query_scores, query.labels, cfg.ndcg_empty_ideal)
        cases.append(
            {
                "qid": query.qid,
                "scores": [float(s) for s in query_scores],
                "ndcg": {k: per_query[k] for k in EVAL_METRICS},
            }
        )
    metrics = {k: float(np.mean([case["ndcg"][k] for case in cases])) for k in EVAL_METRICS}
    print(
        f"{weights.source} on {cfg.target_test_path}: {len(cases)} queries, {sum(len(q.labels) for q in queries)} documents"
    )
    print("  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    run.write_metrics("metrics.json", metrics, cfg.metrics_out)
    if cfg.cases_out and is_rank0():
        write_json_atomic(cfg.cases_out, cases)
    return metrics


# --- LightGBM baselines --------------------------------------------------------------------------------------------


def lightgbm_ndcg(
    train: PackedSplit, test: PackedSplit, seed: int, empty_ideal: float = 1.0
) -> dict[str, float | int]:
    """LightGBM `lambdarank` (its defaults, 100 trees) fit on `train`'s queries, NDCG@k of its scores on `test`'s
    queries (every document; our NDCG, so the numbers compare with the stages')."""
    try:
        import lightgbm
    except ImportError:
        raise InputError(
            "the LightGBM baselines need lightgbm (pip install -r requirements.txt, or pip install lightgbm)"
        ) from None
    ranker = lightgbm.LGBMRanker(
        objective="lambdarank", random_state=seed, deterministic=True, n_jobs=1, verbose=-1
    )
    ranker.fit(train.features, train.labels, group=np.diff(train.offsets))
    scores = ranker.predict(test.features)
    per_query = [
        clip_ndcg(scores[test.rows(q)], test.labels[test.rows(q)], empty_ideal) for q in range(len(test))
    ]
    return mean_ndcg(per_query)


def baselines(cfg: Config, run: RunDir) -> dict[str, dict]:
    """`letor_baselines`: LightGBM lambdarank on the target's test split of `--fold`, trained on the target's
    train split (raw rows: the supervised upper reference, it needs target labels) and on the source's only (the
    widths differ, so on the aligned vectors of `--alignment_model_path`: no transfer beyond the alignment)."""
    align = read_alignment(cfg)
    widths = {"target": align.target_feat_dim, "source": align.source_feat_dim}
    data = read_fold(cfg, cfg.fold, widths)
    aligned = {
        key: project(cfg, align, key[0], data[key]) for key in (("source", "train"), ("target", "test"))
    }
    metrics = {
        "lightgbm_target": lightgbm_ndcg(
            data["target", "train"], data["target", "test"], cfg.seed, cfg.ndcg_empty_ideal
        ),
        "lightgbm_source": lightgbm_ndcg(
            aligned["source", "train"], aligned["target", "test"], cfg.seed, cfg.ndcg_empty_ideal
        ),
    }
    for name, values in metrics.items():
        print(f"{name}: target test " + "  ".join(f"{k}={v:.4f}" for k, v in values.items() if k != "clips"))
    run.write_metrics("metrics.json", metrics, cfg.metrics_out)
    return metrics


def data_summary(cfg: Config, run: RunDir) -> None:
    """`data_summary --task letor`: per domain and split of `--fold`, queries, documents, label histogram, width."""
    data = read_fold(cfg, cfg.fold, {"target": cfg.target_feat_dim, "source": cfg.source_feat_dim})
    summary = {f"{domain}/{split}": packed.summary() for (domain, split), packed in data.items()}
    print(json.dumps(summary, indent=2))
    run.write_metrics("data_summary.json", summary, cfg.metrics_out)
