"""The RL epochs of `train_rl_cap` (issue 10): one module per epoch ('worker' or 'manager', `epoch_phase`), the
other frozen (no gradient, so Adam leaves its parameters and moments alone), with one of two objectives.

`--rl_objective scst` (self-critical sequence training with hierarchical credit), per batch:
  1. sample K = --rl_samples captions per segment (the segmenter and the goals see the sampled prefix; the manager
     explores when it is the module being trained);
  2. prefix rewards R_n(t) = reward(tokens[:t+1], reference) for every position of every sample (METEOR 1.5 or
     CIDEr-D; one batched, cached request), and the baseline's curve B_n(t): the greedy caption's prefix
     reward (`--scst_baseline greedy`), or the mean over the segment's other samples (`mean`), each held at its
     final value after its end; at a sample's last token B_n is the baseline's *sentence* reward;
  3. sub-goal k of a sample covers its tokens from a goal start to the segment end e_k (the BM ablation: the whole
     caption is one sub-goal). Gain g_k = R(e_k) − R(e_{k−1}) (R(e_{−1}) = 0) and baseline gain
     b_k = B(e_k) − B(e_{k−1}); the gains add up to the sentence reward, the advantages g_k − b_k to
     R(sentence) − B(sentence);
  4. worker: L = −Σ_t (g_k(t) − b_k(t)) · log π(y_t) / #tokens (padding masked);
     manager: L = −Σ_k D_k · log N(goal_k | manager's mean) / #goals, D_k = Σ_{j≥k} γ^{j−k} (g_j − b_j),
     γ = --rl_gamma_manager;
  `--scst_baseline value`: b is the value functions' prediction instead (worker: V_w at each token against
  g_k(t); manager: V_m at each goal start against Σ_{j≥k} γ^{j−k} g_j).

`--rl_objective biased_kl` (the original's objective, bugs fixed), per batch: a teacher-forced
pass; one token ŷ_t sampled per position; prefix rewards R(t) of ŷ[:t+1] and ΔR_t = R(t) − R(t−1). The worker's
score is G_t = Σ_{t'≥t} γ_w^{t'−t} ΔR_t' (γ_w = --rl_gamma_worker); the manager's, at each goal start, is the
discounted sum of the gains of the sub-goals from there (γ = --rl_gamma_manager). With --rl_stabilize the value
function's prediction is subtracted. The amplitude a_t = clamp(score · p(ŷ_t) · N, 0, 1) (N: the row's tokens or
goals) moves a share (1 − ε) · a_t of the target distribution's mass from the ground-truth token to ŷ_t
(`model.captioning.losses.biased_kl_loss`); a is detached unless --compat_biased_kl_grad.

Every random draw of a step (sampled tokens, explored goals) comes from the stream of its row, keyed by (seed,
optimiser step, segment index, what is drawn, sample) (`sample_streams`): under torchrun a segment takes the same draws whichever
rank holds it, so N processes take the steps of one.

Under `--amp bf16|fp16` the agent's and the value functions' forward passes run in autocast; their outputs are
taken in fp32 (`in_fp32`), so the rewards' arithmetic, the advantages, the losses and their reductions are fp32.

Both objectives train the trained module's value function (MSE on the masked positions, --rl_value_function_lr)
against the undiscounted-by-baseline scores above. Every epoch returns means of what matters: reward, baseline,
advantage, entropy, fraction of tokens that end a segment, the losses, and the reward computation's share of the
step time.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from datasets.captioning.activitynet import CaptionBatch
from datasets.vocabulary import Vocabulary
from epoch_loops.captioning.agent_files import Agents
from epoch_loops.training import diverged
from evaluation.meteor import JavaError
from evaluation.rewards import SentenceReward, build_reward, hypothesis_text, reference_tokens
from model.captioning.decoding import draw, greedy_decode, sample
from model.captioning.losses import biased_kl_loss
from utilities import distributed
from utilities.config import Config
from utilities.distributed import loss_normaliser
from utilities.errors import InputError
from utilities.log import progress
from utilities.seeding import RowStreams, Stream, stream_seed

if TYPE_CHECKING:
    from epoch_loops.captioning.train import Trainer

log = logging.getLogger(__name__)

OBJECTIVES = ("scst", "biased_kl")
# What a row stream is drawn for (`sample_streams`): scst's rollouts (tokens and goals, step by step), biased_kl's
# explored goals and sampled tokens (each drawn at every position at once, so each from its own streams).
SAMPLED_CAPTIONS, EXPLORED_GOALS, SAMPLED_TOKENS = range(3)
Outputs = TypeVar("Outputs")


def check_settings(cfg: Config) -> None:
    """RL flags that cannot work together, reported before any work (each flag's own range is checked when
    the command line is parsed)."""
    if cfg.rl_objective not in OBJECTIVES:
        raise InputError(f"--rl_objective must be one of {', '.join(OBJECTIVES)}, got {cfg.rl_objective!r}")
    if cfg.rl_objective == "scst" and cfg.scst_baseline == "mean" and cfg.rl_samples < 2:
        raise InputError(
            "--scst_baseline mean needs --rl_samples 2 or more (the mean of the *other* samples)"
        )
    if cfg.rl_objective == "scst" and cfg.rl_stabilize:
        raise InputError("--rl_stabilize is biased_kl's value baseline; with scst use --scst_baseline value")


# ---- rewards ----------------------------------------------------------------------------------------------------


class NonFiniteReward(ValueError):
    pass


@dataclass
class Rewards:
    """The run's sentence reward and its references, PTB-tokenised once (one Java call for all train captions);
    `seconds` accumulates the time spent scoring."""

    reward: SentenceReward
    references: dict[str, str]  # raw CSV caption → tokenised as the evaluator tokenises references
    vocab: Vocabulary
    seconds: float = 0.0
    specials: frozenset[int] = field(init=False)

    def __post_init__(self):
        v = self.vocab
        self.specials = frozenset((v.pad_idx, v.start_idx, v.end_idx, v.unk_idx))

    def prefix_rewards(self, tokens: torch.Tensor, mask: torch.Tensor, refs: Sequence[str]) -> torch.Tensor:
        """(N, T): the reward of tokens[n, : t + 1] (special tokens left out) against refs[n] where mask[n, t],
        0 elsewhere. All pairs of the call go to the reward in one batch."""
        hyps, pair_refs, rows, cols = [], [], [], []
        for n, (row, real) in enumerate(zip(tokens.tolist(), mask.tolist(), strict=True)):
            words: list[str] = []
            for t, (token, is_real) in enumerate(zip(row, real, strict=True)):
                if not is_real:
                    break
                if token not in self.specials:
                    words.append(self.vocab.itos[token])
                hyps.append(hypothesis_text(words))
                pair_refs.append(refs[n])
                rows.append(n)
                cols.append(t)
        scores = torch.zeros(tokens.shape, dtype=torch.float32)
        scores[rows, cols] = torch.from_numpy(self.score(hyps, pair_refs)).float()
        return scores.to(tokens.device)

    def score(self, hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        """Sentence rewards; an empty hypothesis scores 0 without asking. A METEOR process that died is
        restarted once (`Meteor` starts a fresh one on the next call) and the request repeated."""
        started = time.perf_counter()
        scores = np.zeros(len(hyps))
        asked = [i for i, h in enumerate(hyps) if h]
        for attempt in (1, 2):
            try:
                values = self.reward.sentence([hyps[i] for i in asked], [refs[i] for i in asked])
                break
            except JavaError as e:
                if attempt == 2:
                    raise
                log.warning("the reward's METEOR process failed (%s); restarting it and asking again", e)
            except ValueError as e:
                raise NonFiniteReward(str(e)) from None
        if not np.isfinite(values).all():
            raise NonFiniteReward(f"{self.reward.name} returned {values[~np.isfinite(values)][0]}")
        scores[asked] = values
        self.seconds += time.perf_counter() - started
        return scores


def rewards_of(trainer: Trainer) -> Rewards:
    """The run's `Rewards`, built at the first RL epoch and kept on the trainer (its cache lives as long)."""
    if trainer.rewards is None:
        if trainer.cfg.rl_reward == "meteor":
            trainer.meteor.start()  # the JVM loads while the references are tokenised
        captions = list(dict.fromkeys(s.caption for s in trainer.train_batches.dataset.segments))
        tokenised = reference_tokens(captions)
        reward = build_reward(trainer.cfg.rl_reward, trainer.meteor, tokenised)
        trainer.rewards = Rewards(reward, dict(zip(captions, tokenised, strict=True)), trainer.agents.vocab)
    return trainer.rewards


# ---- credit assignment over sub-goals (pure tensor functions, (N, T) each) --------------------------------------


def gains_at_ends(curve: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """At each segment end e_k: curve(e_k) − curve(e_{k−1}) (curve(e_{−1}) = 0); 0 elsewhere."""
    T = curve.shape[1]
    positions = torch.arange(T, device=curve.device).expand_as(ends)
    last_end = torch.where(ends, positions, -1).cummax(1).values
    previous = F.pad(last_end[:, :-1], (1, 0), value=-1)
    before = curve.gather(1, previous.clamp_min(0)) * (previous >= 0)
    return (curve - before) * ends


def spread_over_segments(at_ends: torch.Tensor, ends: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every token gets the value at the end of its own segment (the first end at or after it)."""
    T = at_ends.shape[1]
    positions = torch.arange(T, device=ends.device).expand_as(ends)
    next_end = torch.where(ends, positions, T - 1).flip(1).cummin(1).values.flip(1)
    return at_ends.gather(1, next_end) * mask


def discounted_returns(at_ends: torch.Tensor, ends: torch.Tensor, gamma: float) -> torch.Tensor:
    """At each end e_k: Σ_{j≥k} γ^{j−k} at_ends(e_j); 0 elsewhere."""
    running = torch.zeros_like(at_ends[:, 0])
    out = torch.zeros_like(at_ends)
    for t in reversed(range(at_ends.shape[1])):
        running = torch.where(ends[:, t], at_ends[:, t] + gamma * running, running)
        out[:, t] = running * ends[:, t]
    return out


def held(curve: torch.Tensor, last: torch.Tensor, T: int) -> torch.Tensor:
    """(N, T): curve[n, min(t, last[n])], a prefix-reward curve held at its final value after its end."""
    positions = torch.arange(T, device=curve.device).expand(curve.shape[0], T)
    return curve.gather(1, torch.minimum(positions, last[:, None]))


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real position (0 for an empty row)."""
    return (mask.long().cumsum(1).argmax(1)).long()


def generated_mask(tokens: torch.Tensor, end_idx: int) -> torch.Tensor:
    """Decoded tokens up to and including the first end token (all of them when there is none)."""
    ended_before = F.pad((tokens == end_idx).long().cumsum(1)[:, :-1], (1, 0)) > 0
    return ~ended_before


# ---- one step of each objective --------------------------------------------------------------------------------


@dataclass
class StepResult:
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    stats: dict[str, float]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float((x * mask).sum() / mask.sum().clamp_min(1))


def value_loss(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The value function's MSE over the masked positions (the original averaged over padding too)."""
    return (((values - targets.detach()) ** 2) * mask).sum() / loss_normaliser(mask.sum())


def in_fp32(outputs: Outputs) -> Outputs:
    """A forward pass's outputs (a dataclass of tensors) with every floating tensor in fp32: what the rewards,
    advantages and losses are computed from, whatever the autocast precision of the pass."""
    return replace(
        outputs,
        **{
            f.name: value.float()
            for f in fields(outputs)
            if isinstance(value := getattr(outputs, f.name), torch.Tensor) and value.is_floating_point()
        },
    )


def worker_values(agents: Agents, worker_feat: torch.Tensor, goals: torch.Tensor | None) -> torch.Tensor:
    """V_w([worker_feat ; goal]) in fp32; the BM ablation has no goals: zeros in their place."""
    if goals is None:
        goals = worker_feat.new_zeros(*worker_feat.shape[:-1], agents.agent.cfg.rl_goal_d)
    return agents.worker_value(worker_feat, goals).float()


def scst_step(trainer: Trainer, batch: CaptionBatch, module: str, rewards: Rewards) -> StepResult:
    cfg, agents = trainer.cfg, trainer.agents
    agent, K = agents.agent, cfg.rl_samples
    features = (batch.video, batch.video_mask, batch.audio, batch.audio_mask)
    refs = [rewards.references[c] for c in batch.raw_captions]
    sample_refs = [r for r in refs for _ in range(K)]
    with agent.drawing_from(sample_streams(trainer, batch, SAMPLED_CAPTIONS, K)):
        rollout = sample(agent, *features, max_len=cfg.max_len, num_samples=K, explore=module == "manager")
    rollout = in_fp32(rollout)
    mask = rollout.mask
    N, T = mask.shape
    curve = rewards.prefix_rewards(rollout.tokens, mask, sample_refs)
    last = last_positions(mask)
    final = curve.gather(1, last[:, None]).squeeze(1)
    ends = rollout.segment_ends if rollout.segment_ends is not None else F.one_hot(last, T).bool() & mask
    starts = rollout.goal_starts
    gains = gains_at_ends(curve, ends)

    if cfg.scst_baseline == "value":
        baseline_gains = None
    else:
        if cfg.scst_baseline == "greedy":
            agent.eval()
            with torch.no_grad():
                greedy = greedy_decode(agent, *features, cfg.max_len)
            agent.train()
            greedy_mask = generated_mask(greedy, agent.end_idx)
            greedy_curve = rewards.prefix_rewards(greedy, greedy_mask, refs).repeat_interleave(K, 0)
            greedy_last = last_positions(greedy_mask).repeat_interleave(K, 0)
            base_curve = held(greedy_curve, greedy_last, T)
            base_final = greedy_curve.gather(1, greedy_last[:, None]).squeeze(1)
        else:  # the mean of the segment's other samples
            own = held(curve, last, T).view(-1, K, T)
            base_curve = ((own.sum(1, keepdim=True) - own) / (K - 1)).view(N, T)
            finals = final.view(-1, K)
            base_final = ((finals.sum(1, keepdim=True) - finals) / (K - 1)).view(N)
        base_curve = base_curve.scatter(1, last[:, None], base_final[:, None])
        baseline_gains = gains_at_ends(base_curve, ends)

    stats = {
        "reward": float(final.mean()),
        "entropy": masked_mean(rollout.entropy, mask),
        "segment_end_fraction": masked_mean(ends.float(), mask),
        "length": float(mask.sum(1).float().mean()),
    }
    if module == "worker":
        values = worker_values(agents, rollout.worker_feat, rollout.goals)
        targets = spread_over_segments(gains, ends, mask)
        if baseline_gains is None:
            baseline = values.detach() * mask
            advantage = targets - baseline
        else:
            baseline = spread_over_segments(baseline_gains, ends, mask)
            advantage = spread_over_segments(gains - baseline_gains, ends, mask)
        policy = -(advantage * rollout.log_probs * mask).sum() / loss_normaliser(mask.sum())
        v_loss = value_loss(values, targets, mask)
        weights = mask
    else:
        values = agents.manager_value(rollout.manager_feat).float()
        returns = spread_over_segments(discounted_returns(gains, ends, cfg.rl_gamma_manager), ends, mask)
        targets = returns * starts
        if baseline_gains is None:
            baseline = values.detach() * starts
            advantage = targets - baseline
        else:
            excess = discounted_returns(gains - baseline_gains, ends, cfg.rl_gamma_manager)
            advantage = spread_over_segments(excess, ends, mask) * starts
            baseline = targets - advantage
        policy = -(advantage * rollout.goal_log_probs * starts).sum() / loss_normaliser(starts.sum())
        v_loss = value_loss(values, targets, starts)
        weights = starts
    stats["baseline"] = (
        float(base_final.mean()) if baseline_gains is not None else masked_mean(baseline, weights)
    )
    stats["advantage"] = masked_mean(advantage, weights)
    stats[f"loss_{module}"] = float(policy.detach())
    stats[f"loss_{module}_value"] = float(v_loss.detach())
    return StepResult(policy, v_loss, stats)


def biased_kl_step(trainer: Trainer, batch: CaptionBatch, module: str, rewards: Rewards) -> StepResult:
    cfg, agents = trainer.cfg, trainer.agents
    agent = agents.agent
    with agent.drawing_from(sample_streams(trainer, batch, EXPLORED_GOALS)):
        out = in_fp32(
            agent(batch.video, batch.video_mask, batch.audio, batch.audio_mask, batch.captions[:, :-1])
        )
    targets = batch.captions[:, 1:]
    real = targets != agent.pad_idx
    sampled = draw(out.log_probs, sample_streams(trainer, batch, SAMPLED_TOKENS)).masked_fill(
        ~real, agent.pad_idx
    )
    p_sampled = out.log_probs.gather(-1, sampled[..., None]).squeeze(-1).exp()
    refs = [rewards.references[c] for c in batch.raw_captions]
    curve = rewards.prefix_rewards(sampled, real, refs)
    last = last_positions(real)
    stats = {
        "reward": float(curve.gather(1, last[:, None]).mean()),
        "entropy": masked_mean(-(out.log_probs.exp() * out.log_probs).sum(-1).detach(), real),
    }
    if out.goal_starts is not None:
        ends = (
            F.pad(out.goal_starts[:, 1:], (0, 1), value=False) | F.one_hot(last, real.shape[1]).bool()
        ) & real
        stats["segment_end_fraction"] = masked_mean(ends.float(), real)
    if module == "worker":
        delta = gains_at_ends(curve, real)  # ΔR at every token
        score = discounted_returns(delta, real, cfg.rl_gamma_worker)
        weights = real
        values = worker_values(agents, out.worker_feat, out.goals)
    else:
        gains = gains_at_ends(curve, ends)
        returns = discounted_returns(gains, ends, cfg.rl_gamma_manager)
        weights = out.goal_starts & real
        score = spread_over_segments(returns, ends, real) * weights
        values = agents.manager_value(out.manager_feat).float()
    advantage = score - values.detach() * weights if cfg.rl_stabilize else score
    per_row = weights.sum(1, keepdim=True)
    amplitude = (advantage * p_sampled * per_row).clamp(0, 1) * weights * (sampled != agent.pad_idx)
    if not cfg.compat_biased_kl_grad:
        amplitude = amplitude.detach()
    normaliser = loss_normaliser(real.sum())
    policy = biased_kl_loss(
        out.log_probs, targets, sampled, amplitude, agent.pad_idx, cfg.smoothing, normaliser
    )
    v_loss = value_loss(values, score, weights)
    stats["baseline"] = masked_mean(values.detach(), weights) if cfg.rl_stabilize else 0.0
    stats["advantage"] = masked_mean(advantage, weights)
    stats["amplitude"] = masked_mean(amplitude.detach(), weights)
    stats[f"loss_{module}"] = float(policy.detach())
    stats[f"loss_{module}_value"] = float(v_loss.detach())
    return StepResult(policy, v_loss, stats)


STEPS: dict[str, Callable[[Trainer, CaptionBatch, str, Rewards], StepResult]] = {
    "scst": scst_step,
    "biased_kl": biased_kl_step,
}


# ---- the epoch ---------------------------------------------------------------------------------------------------


def sample_streams(trainer: Trainer, batch: CaptionBatch, draw_kind: int, per_segment: int = 1) -> RowStreams:
    """The random streams of a step's rows, keyed by (seed, optimiser step, segment index, what is drawn, sample):
    a segment draws the same captions and explored goals on 1 or N processes, wherever its batch share lands.
    scst's samples of a segment are consecutive rows."""
    cfg, step = trainer.cfg, trainer.optimisation.step
    return RowStreams(
        [
            stream_seed(Stream.SAMPLE, cfg.seed, step, i, draw_kind, k)
            for i in batch.indices
            for k in range(per_segment)
        ]
    )


def rl_epoch(trainer: Trainer, epoch: int, module: str) -> dict[str, float]:
    """One RL epoch training `module` ('worker' or 'manager') with --rl_objective; returns per-step means of the
    step's statistics (under torchrun the ranks' sample-weighted mean) and `reward_share`, the reward
    computation's share of the epoch's step time."""
    cfg, agents = trainer.cfg, trainer.agents
    agents.agent.train()
    agents.agent.set_phase(module)
    agents.worker_value.train()
    agents.manager_value.train()
    rewards = rewards_of(trainer)
    step = STEPS[cfg.rl_objective]
    trainer.train_batches.sampler.set_epoch(epoch)
    sums: dict[str, float] = defaultdict(float)
    steps = 0
    desc = f"epoch {epoch} {cfg.rl_objective} {module}"
    for i, batch in enumerate(progress(trainer.train_batches, desc=desc, unit="batch")):
        started, rewards.seconds = time.perf_counter(), 0.0
        batch = batch.to(trainer.device, non_blocking=True)
        with distributed.stand_in(batch.stand_in):
            try:
                with trainer.autocast():
                    result = step(trainer, batch, module, rewards)
            except NonFiniteReward as e:
                raise diverged(
                    trainer.optimisation, f"reward ({e})", math.nan, trainer.place(epoch, i, batch)
                ) from None
            loss = result.policy_loss + result.value_loss
            result.stats["grad_norm"] = trainer.optimiser_step(loss, epoch, i, batch, result.stats)
        result.stats["reward_seconds"] = rewards.seconds
        result.stats["step_seconds"] = time.perf_counter() - started
        stats = distributed.mean_over_ranks(result.stats, 0.0 if batch.stand_in else float(len(batch)))
        for key, value in stats.items():
            sums[key] += value
        steps += 1
    means = {key: value / max(steps, 1) for key, value in sums.items()}
    means["reward_share"] = sums["reward_seconds"] / max(sums["step_seconds"], 1e-9)
    return means
