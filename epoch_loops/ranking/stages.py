"""LR²PPO stages 1 and 2, and what all its procedures share.

`--procedure pointwise` trains the fusion scorer on graded labels (SmoothL1 on the relevance levels);
`--procedure reward` trains the pairwise reward model (margin ranking loss); `--procedure ppo`
(epoch_loops/ranking/ppo.py) adapts the scorer with the frozen reward model. Each stage validates every
`--report_steps` steps on `--dev_path`, keeps the best weights (`checkpoints/best.pt`) and the full training
state (`checkpoints/last.pt`, for `--resume`), and at the end reports the selected weights on `--dev_path` and
`--test_path` in metrics.json. `--procedure export_ranking` converts between our checkpoints and the original's
`.bin` files, and `eval --task ranking --pretrained_model_path` scores a checkpoint (`evaluate_checkpoint`).

Fixed against the original: one AdamW with PyTorch's no-decay groups (biases and norm weights), a
linear warm-up/decay schedule over the real number of optimiser steps, deterministic evaluation (stored frame
order, label-position tie rule), the test split reported, a NaN loss stops the run naming the step.
The optimiser step, NaN stop, checkpoint writes and resume are the shared machinery's (epoch_loops/training.py).

Under torchrun (`torchrun --nproc_per_node=N main.py --procedure pointwise ...`) `--batch_size` is the global
batch: the global batches are those of one process (order by (seed, epoch)), each rank trains on its contiguous
share of each, a batch's loss is rescaled so that the averaged gradient is the global batch's (`global_mean`),
and every random draw of a sample is keyed by its dataset index. Validation is sharded: each rank scores its
contiguous part of a split, rank 0 computes the metrics from the gathered scores and hands them to every rank.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset

from datasets.loader import Batches, BatchReader, ShardedBatchSampler, as_collated
from datasets.ranking.lrmovienet import (
    ClipDataset,
    ClipFeatures,
    LabelBatch,
    RewardPairDataset,
    RewardTripletDataset,
    collate_labels,
    read_clip_list,
)
from epoch_loops.ranking.checkpoints import (
    RankingWeights,
    actor_state,
    load_weights,
    model_sizes,
    read_ranking_weights,
    starting_sizes,
    weights_checkpoint,
)
from epoch_loops.training import (
    Optimisation,
    Saver,
    adamw,
    autocast,
    checkpoint_state,
    grad_scaler,
    linear_schedule,
    optimiser_step,
    precision,
    print_best,
    resume,
)
from evaluation.ranking import SELECTION_METRIC, clip_case, clip_ndcg, mean_ndcg, pair_accuracy
from model.ranking.losses import pointwise_loss, reward_margin_loss
from model.ranking.scorer import (
    FusionScorer,
    LabelRankingConfig,
    RewardModel,
    count_trainable_parameters,
)
from utilities import distributed
from utilities.checkpoint import load_checkpoint
from utilities.config import Config
from utilities.errors import InputError, TrainingError
from utilities.files import write_json_atomic
from utilities.log import progress
from utilities.run_dir import RunDir, is_rank0
from utilities.seeding import Stream, data_generator, seed_worker, stream_seed

log = logging.getLogger(__name__)


# --- data, checkpoints --------------------------------------------------------------------------------------


def require(cfg: Config, *flags: str) -> None:
    missing = [f"--{f}" for f in flags if not getattr(cfg, f, None)]
    if missing:
        raise InputError(f"--procedure {cfg.procedure} needs {', '.join(missing)}")


def open_features(cfg: Config) -> ClipFeatures:
    return ClipFeatures(cfg.features_h5, seq_length=cfg.seq_length, dim=cfg.text_feat_dim)


def graded_splits(cfg: Config, features: ClipFeatures) -> dict[str, ClipDataset]:
    """The graded `--dev_path` (selection) and `--test_path` (report) clips, frames in stored order."""
    return {
        s: ClipDataset(read_clip_list(getattr(cfg, f"{s}_path")), features, cfg.max_imgs)
        for s in ("dev", "test")
    }


class _LabelReader(BatchReader):
    """A batch of label items that knows its dataset indices and whether it is a stand-in share."""

    def __init__(self, dataset: Dataset):
        super().__init__(dataset, collate_labels)

    def read(self, indices: list[int]) -> LabelBatch:
        batch = self.collate([self.dataset[i] for i in indices])
        batch.indices, batch.stand_in = list(indices), getattr(indices, "stand_in", False)
        return batch


def loader(
    cfg: Config, dataset: Dataset, *, epoch: int = 0, shuffle: bool = False, skip_batches: int = 0
) -> Batches[LabelBatch]:
    """The batches of one epoch. Training (`shuffle`): global batches of `--batch_size` in an order that depends
    on (seed, epoch) only, cut after `skip_batches` batches so that a resumed run continues exactly where the
    checkpoint left off, on any number of processes; this rank gets its share of each (`stand_in` set where the
    share is empty). Evaluation: this rank's contiguous part of the dataset in file order. Worker seeds come
    from their own generator, never from the global RNG that dropout draws from. A worker's InputError is
    raised as is."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    if shuffle:
        order = torch.randperm(
            len(dataset), generator=data_generator(stream_seed(Stream.SHUFFLE, cfg.seed, epoch))
        )
        global_batches = BatchSampler(order[skip_batches * cfg.batch_size :].tolist(), cfg.batch_size, False)
        batches: Any = ShardedBatchSampler(global_batches)
    else:
        part = distributed.share(range(len(dataset)))
        batches = BatchSampler(part, -(-cfg.batch_size // distributed.world_size()), False)
    return Batches(
        DataLoader(
            _LabelReader(dataset),
            batch_sampler=batches,
            collate_fn=as_collated,
            num_workers=cfg.num_workers,
            worker_init_fn=seed_worker,
            generator=data_generator(stream_seed(Stream.LOADER, cfg.seed, epoch)),
            pin_memory=str(cfg.device).startswith("cuda"),
        )
    )


def save_best(saver: Saver, kind: str, model: nn.Module, cfg: Config, **extra: Any) -> None:
    """`checkpoints/best.pt`: the selected weights, with the run's config (model sizes)."""
    saver.save("best.pt", weights_checkpoint(kind, model.state_dict(), cfg, **extra))


def load_best(run: RunDir, model: nn.Module) -> dict[str, Any]:
    """Put `checkpoints/best.pt`'s weights into `model`; returns the checkpoint (its step / update). Under
    torchrun every rank reads the file rank 0 wrote, after it is complete."""
    distributed.barrier()
    path = run.path / "checkpoints" / "best.pt"
    weights = read_ranking_weights(path)
    load_weights(model, weights.state, weights.source)
    return load_checkpoint(path)


def print_trainable(*models: nn.Module) -> None:
    if is_rank0():
        print(f"trainable parameters: {sum(count_trainable_parameters(m) for m in models)}")


def print_dry_run(*builders: Callable[[], nn.Module]) -> None:
    """`--dry_run`: build the models on the meta device (no memory, no weights) and print their trainable count."""
    with torch.device("meta"):
        print_trainable(*(build() for build in builders))


# --- evaluation -----------------------------------------------------------------------------------------------


@torch.no_grad()
def score_clips(cfg: Config, scorer: FusionScorer, dataset: ClipDataset) -> list[np.ndarray]:
    """Every clip's label scores, in the clip's label order (stored frame order: deterministic); under torchrun
    each rank scores its part and every rank gets all of them, in file order, each clip once. A NaN or
    infinite score stops every rank here, naming the clip: sorted, it would give a plausible but meaningless
    NDCG."""
    scorer.eval()
    scored = []
    for batch in loader(cfg, dataset):
        batch = batch.to(cfg.device)
        out = scorer(batch.frames, batch.text).float().cpu().numpy()
        for clip_id, row, n in zip(batch.clip_ids, out, batch.mask.sum(1).tolist(), strict=True):
            scored.append((clip_id, row[: int(n)]))
    scored = distributed.gather(scored)
    for clip_id, scores in scored:
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            tag = dataset.clips.by_id()[clip_id].tags[bad[0]]
            raise TrainingError(
                f"{dataset.clips.path}: clip {clip_id}: the model gives {bad.size} of its {len(scores)} labels a "
                f"non-finite score (label {bad[0]} {tag!r}: {scores[bad[0]]}); no NDCG is computed "
                "from such scores"
            )
    return [scores for _, scores in scored]


def ndcg(cfg: Config, scorer: FusionScorer, dataset: ClipDataset) -> dict[str, float | int]:
    """NDCG@k averaged over the dataset's clips (the metrics JSON of `eval --task ranking`), computed on rank 0
    and handed to every rank (it selects the checkpoint everywhere)."""
    scores = score_clips(cfg, scorer, dataset)
    metrics = None
    if is_rank0():
        clips = dataset.clips.clips
        metrics = mean_ndcg(
            [clip_ndcg(s, c.targets, cfg.ndcg_empty_ideal) for s, c in zip(scores, clips, strict=True)]
        )
    return distributed.from_rank0(metrics)


SAMPLE_CLIPS = 3  # dev clips whose ranking TensorBoard shows at every report


def ranking_samples(cfg: Config, scorer: FusionScorer, dataset: Dataset, shown: int = 5) -> str | None:
    """The first `SAMPLE_CLIPS` clips of an LRMovieNet split as TensorBoard text (markdown): the scorer's top
    `shown` labels beside the most relevant ones (None for splits without label names, e.g. LETOR's)."""
    if not isinstance(dataset, ClipDataset):
        return None
    subset = copy.copy(dataset)
    subset.clips = replace(dataset.clips, clips=dataset.clips.clips[:SAMPLE_CLIPS])
    lines = []
    for clip, scores in zip(subset.clips.clips, score_clips(cfg, scorer, subset), strict=True):
        ranked = [clip.tags[i] for i in np.argsort(-scores, kind="stable")[:shown]]
        top = max(clip.targets)
        gold = [t for t, level in zip(clip.tags, clip.targets, strict=True) if level == top][:shown]
        lines.append(f"**{clip.id}**: predicted {', '.join(ranked)} | gold (level {top}) {', '.join(gold)}")
    return "\n\n".join(lines)


def write_samples(run: RunDir, tag: str, text: str | None, step: int) -> None:
    """Validation samples (captions, rankings) as TensorBoard text on rank 0."""
    if text and run.writer is not None:
        run.writer.add_text(tag, text, step)


@torch.no_grad()
def reward_pair_accuracy(cfg: Config, model: RewardModel, dataset: RewardTripletDataset) -> dict[str, float]:
    """Share of comparisons where R(chosen) > R(rejected), and the mean reward margin: each rank scores its
    part of the comparisons, rank 0 the metrics over all of them (each counted once), handed to every rank."""
    model.eval()
    chosen, rejected = [], []
    for batch in loader(cfg, dataset):
        batch = batch.to(cfg.device)
        vectors = model.label_features(batch.frames, batch.text)
        chosen.append(model.score_slots(vectors, batch.chosen).float().cpu())
        rejected.append(model.score_slots(vectors, batch.rejected).float().cpu())
    c = torch.cat(distributed.gather(chosen)).numpy()
    r = torch.cat(distributed.gather(rejected)).numpy()
    metrics = None
    if is_rank0():
        metrics = {
            "pair_accuracy": pair_accuracy(c, r),
            "margin": float(np.mean(c - r)),
            "comparisons": len(c),
        }
    return distributed.from_rank0(metrics)


def evaluate_checkpoint(cfg: Config, run: RunDir) -> dict[str, float | int]:
    """`eval --task ranking --pretrained_model_path CKPT --features_h5 H5 --test_path CLIPS.json`: the scorer
    (a pointwise checkpoint or a PPO one's actor, ours or released) ranks every clip; writes the metrics JSON
    and, with `--cases_out`, one case per clip (scores in the clip's label order, NDCG, predicted order)."""
    require(cfg, "features_h5", "test_path")
    weights = read_ranking_weights(cfg.pretrained_model_path)
    sizes = model_sizes(cfg, weights)
    scorer = load_weights(sizes.build_scorer(), actor_state(weights), weights.source).to(cfg.device)
    clips = read_clip_list(cfg.test_path)
    features = ClipFeatures(cfg.features_h5, seq_length=sizes.seq_length, dim=sizes.text_feat_dim)
    dataset = ClipDataset(clips, features, sizes.max_imgs)
    scores = score_clips(cfg, scorer, dataset)
    cases = [
        clip_case(c.id, c.tags, s, c.targets, cfg.ndcg_empty_ideal)
        for c, s in zip(clips.clips, scores, strict=True)
    ]
    metrics = mean_ndcg([case["ndcg"] for case in cases])
    print(f"{weights.source} ({weights.kind}) on {cfg.test_path}: {metrics['clips']} clips")
    print("  ".join(f"{name}={value:.4f}" for name, value in metrics.items() if name != "clips"))
    run.write_metrics("metrics.json", metrics, cfg.metrics_out)
    if cfg.cases_out and is_rank0():
        write_json_atomic(cfg.cases_out, cases)
    return metrics


# --- stages 1 and 2 -------------------------------------------------------------------------------------------


@dataclass
class SupervisedStage:
    """What differs between stage 1 and stage 2; `train_supervised` is the loop they share."""

    kind: str
    model: nn.Module
    train: Dataset
    loss: Callable[[nn.Module, LabelBatch], tuple[Tensor, dict[str, Tensor]]]  # a mean over the batch's ...
    count: Callable[[LabelBatch], Tensor | int]  # ... items: its labels (graded lists) or its comparisons
    evaluate: dict[str, Callable[[nn.Module], dict]]  # "dev" / "test" → metrics
    selection: str  # the key of the dev metrics that selects the checkpoint
    logs: dict[str, list[float]] = field(default_factory=dict)
    samples: Callable[[nn.Module], str | None] | None = None  # dev rankings shown at each report


def train_supervised(cfg: Config, run: RunDir, stage: SupervisedStage) -> dict[str, Any]:
    distributed.check_global_batch("batch_size", cfg.batch_size)
    model, saver = stage.model, Saver(run)
    steps_per_epoch = math.ceil(len(stage.train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs_num
    optimizer = adamw([(model, cfg.learning_rate)], cfg.ranking_weight_decay)
    scheduler = linear_schedule(optimizer, total_steps, cfg.warmup)
    device = torch.device(cfg.device)
    amp = precision(cfg.amp, device)
    opt = Optimisation(stage.kind, optimizer, cfg.grad_clip, run, scheduler, scaler=grad_scaler(amp, device))
    best, history = None, []
    if cfg.resume:
        state = resume(opt, cfg.resume, model, kind=stage.kind)
        best, history = state["best_metric"], state.get("history", [])
    log.info(
        "%s: %d samples, %d steps (%d per epoch)", stage.kind, len(stage.train), total_steps, steps_per_epoch
    )
    while opt.step < total_steps:
        epoch, skip = divmod(opt.step, steps_per_epoch)
        model.train()
        batches = loader(cfg, stage.train, epoch=epoch, shuffle=True, skip_batches=skip)
        for batch in progress(batches, desc=f"{stage.kind} epoch {epoch + 1}/{cfg.epochs_num}"):
            batch = batch.to(cfg.device, non_blocking=True)
            with distributed.stand_in(batch.stand_in):
                with autocast(amp, device):  # the losses take the model's outputs in fp32
                    loss, stats = stage.loss(model, batch)
                count = stage.count(batch)
                optimiser_step(opt, distributed.global_mean(loss, count), f"epoch {epoch + 1}", stats)
            log_step(stage.logs, loss, stats, 0.0 if batch.stand_in else float(count))
            if opt.step % cfg.report_steps and opt.step != total_steps:
                continue
            metrics = stage.evaluate["dev"](model)
            model.train()
            improved = best is None or metrics[stage.selection] > best
            if improved:
                best = metrics[stage.selection]
                save_best(saver, stage.kind, model, cfg, step=opt.step, dev=metrics)
            lr = scheduler.get_last_lr()[0]
            history.append(report(run, stage.kind, opt.step, stage.logs, metrics, lr, improved))
            if stage.samples is not None:
                write_samples(run, f"{stage.kind}/dev_rankings", stage.samples(model), opt.step)
                model.train()
            state = checkpoint_state(opt, cfg, model, epoch=opt.step // steps_per_epoch, best_metric=best)
            saver.save("last.pt", {**state, "kind": stage.kind, "history": history})
            distributed.barrier()  # the checkpoints are complete before any rank goes on
    best_state = load_best(run, model)
    metrics = {
        "dev": stage.evaluate["dev"](model),
        "test": stage.evaluate["test"](model),
        "selected_step": best_state["step"],
        "selection": f"dev {stage.selection}",
        "history": history,
    }
    write_final_metrics(
        run, cfg, f"{stage.kind}: selected step {metrics['selected_step']} on dev {stage.selection}", metrics
    )
    print_best(
        f"step {metrics['selected_step']}",
        f"{stage.selection} {metrics['dev'][stage.selection]:.4f} (dev)",
        run.path / "checkpoints" / "best.pt",
    )
    return metrics


def log_step(logs: dict[str, list[float]], loss: Tensor, stats: dict[str, Tensor], count: float) -> None:
    """Record a step's loss and statistics (means over this rank's `count` items), under torchrun the
    count-weighted mean over the ranks: the numbers one process logs for the same global batch."""
    values = {"loss": float(loss.detach()), **{k: float(v) for k, v in stats.items()}}
    for name, value in distributed.mean_over_ranks(values, count).items():
        logs.setdefault(name, []).append(value)


def write_final_metrics(run: RunDir, cfg: Config, headline: str, metrics: dict) -> dict:
    """Print the selected model's dev and test NDCG under `headline`; write the metrics JSON (run and
    --metrics_out). Rank 0 only."""
    if not is_rank0():
        return metrics
    print(headline)
    for split in ("dev", "test"):
        print(
            f"  {split}: "
            + "  ".join(f"{k}={v:.4f}" for k, v in metrics[split].items() if isinstance(v, float))
        )
    run.write_metrics("metrics.json", metrics, cfg.metrics_out)
    return metrics


def report(
    run: RunDir, kind: str, step: int, logs: dict[str, list[float]], dev: dict, lr: float, improved: bool
) -> dict[str, Any]:
    """Log the training means since the last report and the dev metrics; TensorBoard on rank 0. Returns the
    report for the metrics JSON's `history` (the learning curve `plot` draws)."""
    means = {name: float(np.mean(values)) for name, values in logs.items() if values}
    logs.clear()
    shown = {**{f"train/{k}": v for k, v in means.items()}, **{f"dev/{k}": v for k, v in dev.items()}}
    line = "  ".join(f"{k}={v:.4g}" for k, v in shown.items() if isinstance(v, float))
    log.info(
        "%s %s %d lr %.3g %s%s",
        kind,
        "update" if kind == "ppo" else "step",
        step,
        lr,
        line,
        "  (best)" if improved else "",
    )
    if run.writer is not None:
        for name, value in shown.items():
            if isinstance(value, float):
                run.writer.add_scalar(f"{kind}/{name}", value, step)
        run.writer.add_scalar(f"{kind}/lr", lr, step)
    return {"step": step, "lr": lr, "train": means, "dev": dev}


def pointwise_batch_loss(model: nn.Module, batch: LabelBatch) -> tuple[Tensor, dict[str, Tensor]]:
    """Stage 1's loss on a batch (LRMovieNet clips or LETOR queries): SmoothL1 on the graded labels."""
    return pointwise_loss(model(batch.frames, batch.text).float(), batch.targets, batch.mask), {}


def reward_batch_loss(margin: float) -> Callable[[nn.Module, LabelBatch], tuple[Tensor, dict[str, Tensor]]]:
    """Stage 2's loss on a batch of comparisons: the margin ranking hinge, and the pair accuracy to log."""

    def loss(model: nn.Module, batch: LabelBatch) -> tuple[Tensor, dict[str, Tensor]]:
        vectors = model.label_features(batch.frames, batch.text)  # one trunk pass for chosen and rejected
        chosen = model.score_slots(vectors, batch.chosen).float()
        rejected = model.score_slots(vectors, batch.rejected).float()
        return reward_margin_loss(chosen, rejected, margin), {"accuracy": (chosen > rejected).float().mean()}

    return loss


def real_labels(batch: LabelBatch) -> Tensor:
    """What the pointwise loss averages over: the batch's real (unpadded) labels."""
    return batch.mask.sum()


def ndcg_evaluators(cfg: Config, splits: dict[str, Dataset]) -> dict[str, Callable[[nn.Module], dict]]:
    """Split name → the NDCG@k of a scorer on that split (selection on dev, report on test)."""
    return {s: (lambda m, d=d: ndcg(cfg, m, d)) for s, d in splits.items()}


def pointwise_stage(
    cfg: Config, model: nn.Module, train: Dataset, splits: dict[str, Dataset]
) -> SupervisedStage:
    """Stage 1 on any graded lists (LRMovieNet clips, LETOR queries): SmoothL1, selected on dev NDCG@all."""
    return SupervisedStage(
        "pointwise",
        model,
        train,
        pointwise_batch_loss,
        real_labels,
        ndcg_evaluators(cfg, splits),
        SELECTION_METRIC,
        samples=lambda m: ranking_samples(cfg, m, splits["dev"]),
    )


def reward_stage(
    cfg: Config, model: nn.Module, train: Dataset, splits: dict[str, Dataset]
) -> SupervisedStage:
    """Stage 2 on any comparisons: the margin hinge, selected on dev pair accuracy."""
    evaluate = {s: (lambda m, d=d: reward_pair_accuracy(cfg, m, d)) for s, d in splits.items()}
    return SupervisedStage(
        "reward", model, train, reward_batch_loss(cfg.margin), len, evaluate, "pair_accuracy"
    )


def pointwise(cfg: Config, run: RunDir) -> dict[str, Any] | None:
    """Stage 1: the fusion scorer on graded labels (`--train_path` first_stage_data.json)."""
    if cfg.dry_run:
        print_dry_run(LabelRankingConfig.from_config(cfg).build_scorer)
        return None
    require(cfg, "train_path", "dev_path", "test_path", "features_h5")
    sizes, weights = starting_sizes(cfg)
    model = sizes.build_scorer()
    if weights is not None:
        load_weights(model, actor_state(weights), weights.source)
    model.to(cfg.device)
    print_trainable(model)
    features = open_features(cfg)
    train = ClipDataset(
        read_clip_list(cfg.train_path), features, cfg.max_imgs, cfg.max_tags, cfg.frame_order, cfg.seed
    )
    splits = graded_splits(cfg, features)
    return train_supervised(cfg, run, pointwise_stage(cfg, model, train, splits))


def load_trunk(model: RewardModel, weights: RankingWeights) -> None:
    """Start a reward model's trunk from a scorer's weights; its own slot embedding, XiT and head stay new."""
    trunk = {k: v for k, v in actor_state(weights).items() if not k.startswith("head.")}
    own = {
        k: v
        for k, v in model.state_dict().items()
        if k.startswith(tuple(f"{n}." for n in ("pos_emb", "xitt", "head")))
    }
    load_weights(model, {**trunk, **own}, weights.source)


def reward(cfg: Config, run: RunDir) -> dict[str, Any] | None:
    """Stage 2: the reward model on preference pairs (`--train_path` the pair file); pair accuracy on
    comparisons drawn from the graded dev/test clips. `--pretrained_model_path` (a scorer) starts
    its trunk from stage 1 (the original started from scratch)."""
    if cfg.dry_run:
        print_dry_run(LabelRankingConfig.from_config(cfg).build_reward_model)
        return None
    require(cfg, "train_path", "dev_path", "test_path", "features_h5")
    sizes, weights = starting_sizes(cfg)
    model = sizes.build_reward_model()
    if weights is not None:
        load_trunk(model, weights)
    model.to(cfg.device)
    print_trainable(model)
    features = open_features(cfg)
    train = RewardPairDataset(
        read_clip_list(cfg.train_path, with_pairs=True), features, cfg.max_imgs, cfg.frame_order, cfg.seed
    )
    splits = {
        s: RewardTripletDataset(
            read_clip_list(getattr(cfg, f"{s}_path")),
            features,
            cfg.max_imgs,
            cfg.seed,
            cfg.reward_val_triplets,
        )
        for s in ("dev", "test")
    }
    return train_supervised(cfg, run, reward_stage(cfg, model, train, splits))
