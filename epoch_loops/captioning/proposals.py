"""Proposals of whole videos with BMT's proposal generator (spec §6.1, §6.5.1), shared by `predict`, evaluation
and `--procedure train_prop`.

Selection follows BMT's single-video tool everywhere: clip to the duration, drop proposals of 0.2 s or less,
then keep the top K by objectness (BMT's training-time validation took the top K before filtering, which returns
fewer than K whenever some are clipped away).
"""

from __future__ import annotations

import torch

from datasets.captioning.proposals import VideoBatch
from model.captioning.proposals import ProposalGenerator, decode, select_proposals


@torch.no_grad()
def video_proposals(
    model: ProposalGenerator, batch: VideoBatch, k: int, nms_tiou: float | None = None
) -> list[torch.Tensor]:
    """Per video of the batch, (≤ k, 3) rows (start, end, score) by descending score."""
    outputs = model(
        batch.features["video"], batch.masks["video"], batch.features["audio"], batch.masks["audio"]
    )
    decoded = decode(outputs, batch.n_cells)
    return [select_proposals(decoded[b], d, k, nms_tiou) for b, d in enumerate(batch.durations)]
