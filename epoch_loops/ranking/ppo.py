"""LR²PPO stage 3 (`--procedure ppo`): adapt the scorer to the target label domain with the frozen reward model.

One episode = one label pair (a, b) of one clip. The actor (the stage-1 scorer) scores the pair and
ranks it; the frozen reward model scores `[a, b, 1st, 2nd]`; the critic (started from the reward model) values
the unordered state `[a, b]`. Rollouts of `--update_timesteps` batches are collected, then the actor and critic
are updated `--ppo_epochs` times over the rollout in minibatches of `--minibatch_size`, then the actor is
validated on `--dev_path` and the best actor+critic is kept. Two objectives (model/ranking/losses.py):
- `lr2ppo` (the paper's): the action is the deterministic sort of the scores; an |advantage|-weighted hinge
  keeps the action's order when the advantage is at least `--advantage_threshold`, else swaps it;
- `clip`: a Plackett–Luce policy over the scores (`--pl_temperature`), sampled orders, the clipped ratio
  (`--eps_clip`), a KL penalty to the frozen initial actor, normalised advantages.

The rollout buffer keeps clip ids, label positions, frame keys and per-sample scalars only (the original kept
the feature tensors on the GPU, about 6 GB); each minibatch re-reads its features with `dataset.fetch`, the
frame order included, so the update sees exactly what the rollout saw. Actor and critic run without dropout
throughout, so the policy that sampled is the policy the ratio compares against (the original updated in train
mode). Resuming (`--resume last.pt`) continues after the last completed update, exactly.

Under torchrun `--batch_size` and `--minibatch_size` are global. Each rank collects its share of every global
rollout batch; the small rollout records are gathered, so every rank holds the whole rollout in the order one
process collects it (the advantage normalisation is the rollout's), takes the same global minibatch
permutation and trains on its share of each minibatch, its loss rescaled so that the averaged gradient is the
minibatch's (`global_mean`). Plackett–Luce orders are drawn per pair from a stream keyed by (seed, epoch, the
pair's dataset index), so N processes sample what one does. The next minibatch's (and rollout batch's)
features are read in a background thread, pinned on CUDA (`prefetched`). `--amp` runs the actor's and the
critic's forward passes under autocast (bf16 by default on CUDA); rewards and losses stay fp32.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from datasets.loader import prefetched
from datasets.ranking.lrmovienet import ClipDataset, LabelBatch, PPOPairDataset, read_clip_list
from epoch_loops.ranking.checkpoints import (
    RankingWeights,
    actor_state,
    adopt_sizes,
    load_weights,
    model_sizes,
    read_ranking_weights,
    reward_state,
)
from epoch_loops.ranking.stages import (
    graded_splits,
    load_best,
    loader,
    log_step,
    ndcg,
    open_features,
    print_dry_run,
    print_trainable,
    ranking_samples,
    report,
    require,
    save_best,
    write_final_metrics,
    write_samples,
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
from evaluation.ranking import SELECTION_METRIC
from model.ranking.losses import clip_ppo_loss, lr2ppo_loss
from model.ranking.scorer import (
    RUN_SETTINGS,
    FusionScorer,
    LabelRankingConfig,
    RewardModel,
    plackett_luce_log_prob,
    sample_plackett_luce,
)
from utilities import distributed
from utilities.config import Config
from utilities.errors import InputError
from utilities.log import progress
from utilities.run_dir import RunDir
from utilities.seeding import RowStreams, Stream, data_generator, stream_seed

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """What PPO needs of N collected pairs: ids, positions and scalars, never features."""

    clip_ids: list[str]
    labels: Tensor  # (N, 2) label positions in the clip
    frame_keys: Tensor  # (N,) frame order the actor saw (datasets.ranking.lrmovienet.frame_slots)
    order: Tensor  # (N, 2) the action: positions 0/1 of the pair, ranked
    scores_old: Tensor  # (N, 2) actor scores at rollout
    log_prob_old: Tensor  # (N,) log-probability of `order` under the rollout policy
    reward: Tensor  # (N,) frozen reward model on [a, b, 1st, 2nd]
    value_old: Tensor  # (N,) critic on [a, b]
    ref_scores: Tensor | None = None  # (N, 2) the frozen initial actor's scores (clip objective)
    advantage: Tensor | None = None  # (N,) normalised over the rollout (clip objective)

    def __len__(self) -> int:
        return len(self.clip_ids)

    def select(self, index: Tensor) -> Rollout:
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "clip_ids":
                picked[f.name] = [value[i] for i in index.tolist()]
            else:
                picked[f.name] = None if value is None else value[index]
        return Rollout(**picked)

    def nbytes(self) -> int:
        """Memory held: the tensors plus the id strings."""
        tensors = [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]
        return sum(t.nbytes for t in tensors) + sum(len(c.encode()) for c in self.clip_ids)

    @classmethod
    def concat(cls, parts: list[Rollout]) -> Rollout:
        joined: dict[str, Any] = {"clip_ids": [c for p in parts for c in p.clip_ids]}
        for f in fields(cls):
            if f.name != "clip_ids":
                values = [getattr(p, f.name) for p in parts]
                joined[f.name] = None if values[0] is None else torch.cat(values)
        return cls(**joined)


@dataclass
class PPOModels:
    actor: FusionScorer
    critic: RewardModel
    reward: RewardModel  # frozen
    reference: FusionScorer | None  # frozen initial actor (clip objective)
    sizes: LabelRankingConfig  # the settings the stage checkpoints carry
    amp: str = "none"  # --amp as resolved for the device: the actor's and critic's forward passes

    @property
    def policy(self) -> nn.ModuleDict:
        """Actor + critic as one module: its state dict is the original's PPO `.bin` layout."""
        return nn.ModuleDict({"actor": self.actor, "critic": self.critic})


def build_models(cfg: Config) -> PPOModels:
    """Actor from `--pretrained_model_path` (stage 1), critic and frozen reward model from `--reward_model_path`
    (stage 2), at the settings both checkpoints carry (`stage_sizes`); with `--ppo_objective clip` a frozen copy
    of the initial actor is the KL reference."""
    actor_weights = read_ranking_weights(cfg.pretrained_model_path)
    reward_weights = read_ranking_weights(cfg.reward_model_path)
    sizes = stage_sizes(cfg, actor_weights, reward_weights)
    actor = load_weights(sizes.build_scorer(), actor_state(actor_weights), actor_weights.source)
    critic = load_weights(sizes.build_reward_model(), reward_state(reward_weights), reward_weights.source)
    reward_model = copy.deepcopy(critic).requires_grad_(False)
    reference = copy.deepcopy(actor).requires_grad_(False) if cfg.ppo_objective == "clip" else None
    for bias in actor.shift_parameters():  # ranking objectives see score differences only
        bias.requires_grad_(False)
    amp = precision(cfg.amp, torch.device(cfg.device))
    models = PPOModels(actor, critic, reward_model, reference, sizes, amp)
    for model in (actor, critic, reward_model, reference):
        if model is not None:
            model.to(cfg.device).eval()  # no dropout anywhere in PPO
    return models


def stage_sizes(cfg: Config, actor: RankingWeights, reward: RankingWeights) -> LabelRankingConfig:
    """The sizes and attention mode of the two stage checkpoints (`model_sizes`: our checkpoints' saved config;
    for a released file the flags and the original's attention); checkpoints that differ are an error naming
    both files and the settings."""
    actor_sizes, reward_sizes = model_sizes(cfg, actor), model_sizes(cfg, reward)
    differ = [
        f"{f.name} {getattr(actor_sizes, f.name)} vs {getattr(reward_sizes, f.name)}"
        for f in fields(LabelRankingConfig)
        if f.name not in RUN_SETTINGS and getattr(actor_sizes, f.name) != getattr(reward_sizes, f.name)
    ]
    if differ:
        raise InputError(
            f"--pretrained_model_path {actor.source} and --reward_model_path {reward.source} were trained at "
            f"different settings: {', '.join(differ)}"
        )
    return actor_sizes


def ppo(cfg: Config, run: RunDir) -> dict[str, Any] | None:
    if cfg.dry_run:
        sizes = LabelRankingConfig.from_config(cfg)
        print_dry_run(sizes.build_scorer, sizes.build_reward_model)
        return None
    require(
        cfg,
        "train_path",
        "dev_path",
        "test_path",
        "features_h5",
        "pretrained_model_path",
        "reward_model_path",
    )
    models = build_models(cfg)
    adopt_sizes(cfg, models.sizes)  # the data and PPO's checkpoints follow the stages
    print_trainable(models.actor, models.critic)
    features = open_features(cfg)
    train = PPOPairDataset(
        read_clip_list(cfg.train_path), features, cfg.max_imgs, cfg.max_tags, cfg.frame_order, cfg.seed
    )
    return train_ppo(cfg, run, models, train, graded_splits(cfg, features))


def rollout_sizes(n_samples: int, batch_size: int, update_timesteps: int) -> list[int]:
    """Pairs in each rollout of one epoch: `update_timesteps` batches, the epoch's last rollout shorter."""
    batches = [batch_size] * (n_samples // batch_size) + (
        [n_samples % batch_size] if n_samples % batch_size else []
    )
    return [sum(batches[i : i + update_timesteps]) for i in range(0, len(batches), update_timesteps)]


def train_ppo(
    cfg: Config, run: RunDir, models: PPOModels, train: PPOPairDataset, splits: dict[str, ClipDataset]
) -> dict[str, Any]:
    minibatch = cfg.minibatch_size or cfg.batch_size
    distributed.check_global_batch("batch_size", cfg.batch_size)
    distributed.check_global_batch("minibatch_size" if cfg.minibatch_size else "batch_size", minibatch)
    sizes = rollout_sizes(len(train), cfg.batch_size, cfg.update_timesteps)
    steps_per_epoch = cfg.ppo_epochs * sum(math.ceil(n / minibatch) for n in sizes)
    batches_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs_num
    policy, saver = models.policy, Saver(run)
    optimizer = adamw(
        [(models.actor, cfg.learning_rate), (models.critic, cfg.critic_learning_rate)],
        cfg.ranking_weight_decay,
    )
    opt = Optimisation(
        "ppo",
        optimizer,
        cfg.grad_clip,
        run,
        linear_schedule(optimizer, total_steps, cfg.warmup),
        scaler=grad_scaler(models.amp, torch.device(cfg.device)),
    )
    updates, epoch, batches_done = 0, 0, 0
    logs: dict[str, list[float]] = {}
    history: list[dict[str, Any]] = []
    if cfg.resume:
        state = resume(opt, cfg.resume, policy, kind="ppo")
        best, epoch, batches_done, updates = (
            state[k] for k in ("best_metric", "epoch", "batches_done", "updates")
        )
        history = state.get("history", [])
    else:
        initial = ndcg(cfg, models.actor, splits["dev"])  # the initial actor is a candidate too
        best = initial[SELECTION_METRIC]
        save_best(saver, "ppo", policy, cfg, step=0, updates=0, dev=initial)
        log.info("ppo: initial actor dev NDCG@all %.4f", best)
    log.info("ppo (%s): %d pairs per epoch, %d optimiser steps", cfg.ppo_objective, len(train), total_steps)
    while epoch < cfg.epochs_num:
        if batches_done >= batches_per_epoch:
            epoch, batches_done = epoch + 1, 0
            continue
        parts: list[Rollout | None] = []  # this rank's share of each global batch (None: a stand-in)
        batches = loader(cfg, train, epoch=epoch, shuffle=True, skip_batches=batches_done)
        pin = torch.device(cfg.device).type == "cuda"
        for batch in progress(prefetched(batches, pin), desc=f"ppo epoch {epoch + 1}/{cfg.epochs_num}"):
            if batch.stand_in:
                parts.append(None)
            else:
                streams = RowStreams([stream_seed(Stream.ROLLOUT, cfg.seed, epoch, i) for i in batch.indices])
                parts.append(collect(cfg, models, batch.to(cfg.device, non_blocking=True), streams))
            batches_done += 1
            if len(parts) < cfg.update_timesteps and batches_done < batches_per_epoch:
                continue
            rollout = global_rollout(parts)
            parts = []
            update(cfg, models, train, rollout, opt, updates, logs)
            updates += 1
            metrics = ndcg(cfg, models.actor, splits["dev"])
            improved = metrics[SELECTION_METRIC] > best
            if improved:
                best = metrics[SELECTION_METRIC]
                save_best(saver, "ppo", policy, cfg, step=opt.step, updates=updates, dev=metrics)
            record = report(run, "ppo", updates, logs, metrics, opt.scheduler.get_last_lr()[0], improved)
            history.append({**record, "step": opt.step, "update": updates})
            write_samples(run, "ppo/dev_rankings", ranking_samples(cfg, models.actor, splits["dev"]), updates)
            state = checkpoint_state(opt, cfg, policy, epoch=epoch, best_metric=best)
            extra = {"kind": "ppo", "batches_done": batches_done, "updates": updates, "history": history}
            saver.save("last.pt", {**state, **extra})
            distributed.barrier()  # the checkpoints are complete before any rank goes on
    selected = load_best(run, policy)
    metrics = {
        "dev": ndcg(cfg, models.actor, splits["dev"]),
        "test": ndcg(cfg, models.actor, splits["test"]),
        "selected_update": selected["updates"],
        "updates": updates,
        "objective": cfg.ppo_objective,
        "selection": f"dev {SELECTION_METRIC}",
        "history": history,
    }
    headline = f"ppo ({cfg.ppo_objective}): selected update {metrics['selected_update']} of {updates} on dev"
    write_final_metrics(run, cfg, headline, metrics)
    print_best(
        f"update {metrics['selected_update']}",
        f"{SELECTION_METRIC} {metrics['dev'][SELECTION_METRIC]:.4f} (dev)",
        run.path / "checkpoints" / "best.pt",
    )
    return metrics


def global_rollout(parts: list[Rollout | None]) -> Rollout:
    """The rollout of the global batches as one process collects it: batch after batch, each batch's shares in
    rank order (a stand-in share holds nothing). Every rank gets it whole: it holds no features."""
    shares = distributed.gather([parts])  # per rank, its parts
    return Rollout.concat([p for j in range(len(parts)) for rank in shares if (p := rank[j]) is not None])


@torch.no_grad()
def collect(
    cfg: Config, models: PPOModels, batch: LabelBatch, generator: torch.Generator | RowStreams
) -> Rollout:
    """One rollout batch: act on every pair, score the ranked pair with the reward model, value the state. The
    Plackett–Luce orders (clip objective) draw from `generator`: one stream per pair (`RowStreams`) in
    training."""
    with autocast(models.amp, batch.frames.device):
        scores = models.actor(batch.frames, batch.text).float()
        value = models.critic(batch.frames, batch.text).float()
        ref = None if models.reference is None else models.reference(batch.frames, batch.text).float().cpu()
    if cfg.ppo_objective == "lr2ppo":
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    else:
        order = sample_plackett_luce(scores, temperature=cfg.pl_temperature, generator=generator)
    context = torch.arange(2, device=scores.device).expand_as(order)
    reward = models.reward(batch.frames, batch.text, torch.cat([context, order], dim=1))
    return Rollout(
        clip_ids=list(batch.clip_ids),
        labels=batch.labels.cpu(),
        frame_keys=batch.frame_keys.cpu(),
        order=order.cpu(),
        scores_old=scores.cpu(),
        log_prob_old=plackett_luce_log_prob(scores, order, temperature=cfg.pl_temperature).cpu(),
        reward=reward.cpu(),
        value_old=value.cpu(),
        ref_scores=ref,
    )


def update(
    cfg: Config,
    models: PPOModels,
    dataset: PPOPairDataset,
    rollout: Rollout,
    opt: Optimisation,
    updates: int,
    logs: dict[str, list[float]],
) -> None:
    """`--ppo_epochs` passes over the (whole, global) rollout in shuffled minibatches, one optimiser step each;
    this rank trains on its share of each minibatch, its features read ahead in the background."""
    if cfg.ppo_objective == "clip":
        advantage = rollout.reward - rollout.value_old
        rollout.advantage = (advantage - advantage.mean()) / (advantage.std(unbiased=False) + 1e-8)
    logs.setdefault("reward", []).append(float(rollout.reward.mean()))
    logs.setdefault("value", []).append(float(rollout.value_old.mean()))
    steps = minibatch_shares(cfg, len(rollout), updates)
    parts = [rollout.select(torch.tensor(mine)) for _, mine, _ in steps]
    pin = torch.device(cfg.device).type == "cuda"
    features = prefetched((minibatch_features(dataset, part) for part in parts), pin)
    for (ppo_epoch, _, stand_in), part, batch in zip(steps, parts, features, strict=True):
        with distributed.stand_in(stand_in):
            loss, stats = objective_loss(cfg, models, part, batch.to(cfg.device, non_blocking=True))
            where = f"update {updates + 1}, ppo epoch {ppo_epoch + 1}"
            optimiser_step(
                opt, distributed.global_mean(loss, len(part)), where, {**stats, "reward": part.reward.mean()}
            )
        log_step(logs, loss, stats, 0.0 if stand_in else float(len(part)))


def minibatch_shares(cfg: Config, n: int, updates: int) -> list[tuple[int, list[int], bool]]:
    """Per optimiser step of an update over a rollout of `n` pairs: the PPO epoch, this rank's share of the
    global minibatch (positions in the rollout) and whether it is a stand-in (an empty share: the minibatch's
    first pair, stepped on with weight 0). The minibatch order depends on (seed, update, PPO epoch) only."""
    minibatch = cfg.minibatch_size or cfg.batch_size
    steps = []
    for ppo_epoch in range(cfg.ppo_epochs):
        generator = data_generator(stream_seed(Stream.MINIBATCH, cfg.seed, updates, ppo_epoch))
        for index in torch.randperm(n, generator=generator).split(minibatch):
            mine = distributed.share(index.tolist())
            steps.append((ppo_epoch, mine or index[:1].tolist(), not mine))
    return steps


def minibatch_features(dataset: PPOPairDataset, part: Rollout) -> LabelBatch:
    """A minibatch's features re-read from the dataset, frame order included: what the rollout saw."""
    return dataset.fetch(part.clip_ids, part.labels.tolist(), part.frame_keys.tolist())


def objective_loss(
    cfg: Config, models: PPOModels, part: Rollout, batch: LabelBatch
) -> tuple[Tensor, dict[str, Tensor]]:
    """The objective's loss on a minibatch (a mean over its pairs) and its statistics. Under `--amp` the actor
    and the critic run under autocast; the losses are computed in fp32."""
    on = {f.name: getattr(part, f.name) for f in fields(part)}
    on = {k: v.to(cfg.device) for k, v in on.items() if isinstance(v, Tensor)}
    with autocast(models.amp, batch.frames.device):
        scores = models.actor(batch.frames, batch.text).float()
        value = models.critic(batch.frames, batch.text).float()
    if cfg.ppo_objective == "lr2ppo":
        return lr2ppo_loss(
            scores,
            on["scores_old"],
            on["order"],
            on["reward"],
            value,
            on["value_old"],
            kl_weight=cfg.kl_div_loss_weight,
            entropy_weight=cfg.entropy_weight,
            value_clip=cfg.value_clip,
            advantage_threshold=cfg.advantage_threshold,
            rank_margin=cfg.rank_margin,
        )
    return clip_ppo_loss(
        scores,
        on["order"],
        on["log_prob_old"],
        on["advantage"],
        on["reward"],
        value,
        on["value_old"],
        on["ref_scores"],
        temperature=cfg.pl_temperature,
        eps_clip=cfg.eps_clip,
        kl_weight=cfg.kl_div_loss_weight,
        entropy_weight=cfg.entropy_weight,
        value_clip=cfg.value_clip,
    )
