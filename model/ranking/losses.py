"""LR²PPO's objectives as pure tensor functions; the training loops (epoch_loops/ranking*.py) call them.

Every loss is a mean over the samples of the batch it is given: under DDP each rank's equally sized batch then
gives the gradient of the global batch after DDP's gradient averaging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model.ranking.scorer import plackett_luce_entropy, plackett_luce_log_prob


def pointwise_loss(scores: Tensor, targets: Tensor, mask: Tensor, beta: float = 0.3) -> Tensor:
    """Stage 1: SmoothL1 (β 0.3) between each real label's score and its relevance level."""
    return F.smooth_l1_loss(scores[mask], targets[mask], beta=beta)


def reward_margin_loss(chosen: Tensor, rejected: Tensor, margin: float) -> Tensor:
    """Stage 2: mean(relu(m − (R(chosen) − R(rejected))))."""
    return F.relu(margin - (chosen - rejected)).mean()


def clipped_value_loss(value: Tensor, value_old: Tensor, target: Tensor, clip: float) -> Tensor:
    """PPO's clipped value loss: the worse of the plain and the clipped squared error."""
    clipped = value_old + (value - value_old).clamp(-clip, clip)
    return torch.maximum((clipped - target) ** 2, (value - target) ** 2).mean()


def _check_pairs(scores: Tensor) -> None:
    if scores.dim() != 2 or scores.shape[1] != 2:
        raise ValueError(f"PPO samples are label pairs: expected scores [B, 2], got {list(scores.shape)}")


def lr2ppo_loss(
    scores: Tensor,
    scores_old: Tensor,
    order: Tensor,
    reward: Tensor,
    value: Tensor,
    value_old: Tensor,
    *,
    kl_weight: float,
    entropy_weight: float,
    value_clip: float,
    advantage_threshold: float,
    rank_margin: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The paper's pairwise PPO step with its bugs fixed.

    scores / scores_old `[B, 2]`: the actor's scores now / at rollout; order `[B, 2]`: the rollout's action (the
    pair sorted by scores_old); reward, value, value_old `[B]`. With p = softmax(scores) over the pair:
      KL_b = KL(p_old ‖ p),  H_b = H(p),  r̃_b = r_b − w_KL·KL_b,  A_b = r̃_b − V_old,b  (detached),
      target order: the action if A_b ≥ threshold, else the swapped pair,
      hinge_b = relu(μ − (s_first − s_second)),
      policy loss = mean_b(|A_b| · hinge_b) + w_KL · mean KL − w_H · mean H,
      value loss  = clipped squared error of V against r̃ (detached).
    The original multiplied one batch-wide hinge scalar by an undetached |A|, so KL gradients leaked through
    the weight; here |A| only weights each sample's own hinge and the KL is a term of its own.
    """
    _check_pairs(scores)
    log_p, log_p_old = scores.log_softmax(-1), scores_old.log_softmax(-1)
    kl = (log_p_old.exp() * (log_p_old - log_p)).sum(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    shaped_reward = reward - kl_weight * kl
    advantage = (shaped_reward - value_old).detach()
    keep = advantage >= advantage_threshold
    first = torch.where(keep, order[:, 0], order[:, 1])
    second = torch.where(keep, order[:, 1], order[:, 0])
    gap = scores.gather(1, first[:, None]) - scores.gather(1, second[:, None])
    hinge = F.relu(rank_margin - gap.squeeze(1))
    rank_loss = (advantage.abs() * hinge).mean()
    policy_loss = rank_loss + kl_weight * kl.mean() - entropy_weight * entropy.mean()
    value_loss = clipped_value_loss(value, value_old, shaped_reward.detach(), value_clip)
    stats = {
        "rank_loss": rank_loss,
        "kl": kl.mean(),
        "entropy": entropy.mean(),
        "advantage": advantage.mean(),
        "swap_fraction": (~keep).float().mean(),
        "value_loss": value_loss,
    }
    return policy_loss + value_loss, {k: v.detach() for k, v in stats.items()}


def clip_ppo_loss(
    scores: Tensor,
    order: Tensor,
    log_prob_old: Tensor,
    advantage: Tensor,
    reward: Tensor,
    value: Tensor,
    value_old: Tensor,
    ref_scores: Tensor,
    *,
    temperature: float,
    eps_clip: float,
    kl_weight: float,
    entropy_weight: float,
    value_clip: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Standard PPO for a stochastic ranking policy: Plackett–Luce over the label scores (÷ temperature).

    order `[B, L]`: the orders sampled at rollout; log_prob_old `[B]` their log-probability then; advantage `[B]`
    (normalised by the caller over the whole rollout); reward `[B]` the one-step return; ref_scores `[B, L]` the
    frozen initial policy's scores. Loss = clipped surrogate + w_KL · KL(π ‖ π_ref) − w_H · H(π) + clipped value
    loss. The KL uses the k3 estimator on the sampled orders, (π_ref/π − 1) − log(π_ref/π) ≥ 0; the entropy is
    the chain-rule entropy along the sampled order (exact for pairs). Stats as CleanRL logs them: approx-KL
    ((ratio − 1) − log ratio) and the fraction of samples whose ratio was clipped.
    """
    log_prob = plackett_luce_log_prob(scores, order, temperature=temperature)
    log_ratio = log_prob - log_prob_old
    ratio = log_ratio.exp()
    surrogate = torch.maximum(
        -advantage * ratio, -advantage * ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip)
    ).mean()
    ref_log_ratio = plackett_luce_log_prob(ref_scores, order, temperature=temperature) - log_prob
    kl = (ref_log_ratio.exp() - 1.0 - ref_log_ratio).mean()
    entropy = plackett_luce_entropy(scores, order, temperature=temperature).mean()
    value_loss = clipped_value_loss(value, value_old, reward, value_clip)
    loss = surrogate + kl_weight * kl - entropy_weight * entropy + value_loss
    with torch.no_grad():
        stats = {
            "policy_loss": surrogate,
            "kl_ref": kl,
            "entropy": entropy,
            "approx_kl": ((ratio - 1.0) - log_ratio).mean(),
            "clip_fraction": ((ratio - 1.0).abs() > eps_clip).float().mean(),
            "value_loss": value_loss,
        }
    return loss, {k: v.detach() for k, v in stats.items()}
