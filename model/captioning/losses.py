"""The agent's supervised objective (pure tensor functions; the training loops call them)."""

from __future__ import annotations

import torch


def label_smoothing_loss(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    pad_idx: int,
    smoothing: float,
    normalizer: float | None = None,
) -> torch.Tensor:
    """KL(q ‖ p) summed over the non-padding targets and divided by `normalizer` (default: their number; under
    DDP pass the global count so that the gradient is the same for the same global batch). q puts 1 − ε on the
    target and ε / (V − 2) on every other token except padding, which gets 0.

    log_probs (B, L, V), targets (B, L)."""
    V = log_probs.shape[-1]
    q = torch.full_like(log_probs, smoothing / (V - 2))
    q.scatter_(-1, targets[..., None], 1 - smoothing)
    q[..., pad_idx] = 0
    real = targets != pad_idx
    kl = (torch.xlogy(q, q) - q * log_probs).sum(-1)
    total = (kl * real).sum()
    return total / (real.sum() if normalizer is None else normalizer)


# The original's constant factor on the BiasedKL loss ("impact 4 / norm 20"): the loss is divided by 0.2.
BIASED_KL_SCALE = 0.2


def biased_kl_loss(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    sampled: torch.Tensor,
    amplitude: torch.Tensor,
    pad_idx: int,
    smoothing: float,
    normalizer: float | torch.Tensor,
) -> torch.Tensor:
    """The original's RL objective (its RL step): KL(q ‖ p) over the non-padding targets, where q is the
    label-smoothing target with a share (1 − ε)·a of the mass moved from the target token to the sampled token:
    q(y) = (1 − ε)(1 − a), q(ŷ) += (1 − ε)·a, ε / (V − 2) elsewhere, 0 on padding. Summed, divided by
    `normalizer` · BIASED_KL_SCALE. The gradient flows through `amplitude` (B, L) unless the caller detaches it.

    log_probs (B, L, V); targets, sampled (B, L)."""
    V = log_probs.shape[-1]
    kept = (1 - smoothing) * (1 - amplitude)
    moved = (1 - smoothing) * amplitude
    q = torch.full_like(log_probs, smoothing / (V - 2)).detach()
    q = q.scatter(-1, targets[..., None], kept[..., None])
    q = q.index_fill(-1, torch.tensor([pad_idx], device=q.device), 0.0)
    q = q.scatter_add(-1, sampled[..., None], moved[..., None])
    real = targets != pad_idx
    # xlogy(q, q), with a finite gradient at q = 0 (an amplitude of 1 empties the target token)
    entropy_term = q * q.clamp_min(1e-30).log()
    kl = (entropy_term - q * log_probs).sum(-1)
    return (kl * real).sum() / (normalizer * BIASED_KL_SCALE)
