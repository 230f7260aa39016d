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
    target and ε / (V − 2) on every other token except padding, which gets 0 (spec §4.4).

    log_probs (B, L, V), targets (B, L)."""
    V = log_probs.shape[-1]
    q = torch.full_like(log_probs, smoothing / (V - 2))
    q.scatter_(-1, targets[..., None], 1 - smoothing)
    q[..., pad_idx] = 0
    real = targets != pad_idx
    kl = (torch.xlogy(q, q) - q * log_probs).sum(-1)
    total = (kl * real).sum()
    return total / (real.sum() if normalizer is None else normalizer)
