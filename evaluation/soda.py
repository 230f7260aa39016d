"""SODA_c (Fujita et al., ECCV 2020) as fujiso/SODA computes it and PDVC reports it.

Per reference file and per reference video that the submission contains: predictions and references are
sorted by start time, each (reference, prediction) pair is weighted by tIoU × METEOR(hypothesis = reference,
reference = prediction — the argument order SODA passes to pycocoevalcap), the best temporally ordered
one-to-one matching is found by dynamic programming, and F = 2PR/(P+R) with P = score/#predictions and
R = score/#references. SODA_c is the mean F over those videos (an empty prediction list scores 0), averaged
over the reference files as PDVC's `eval_soda` does. Reference videos missing from the submission are skipped,
as in SODA (the official captioning metrics count them as 0 instead).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from evaluation.formats import TimedSentence, remove_nonascii, tiou_matrix
from evaluation.meteor import Meteor


def ordered_matching_score(weights: np.ndarray) -> float:
    """Max total weight of a one-to-one matching that keeps both orders (rows and columns increasing).

    dp[i, j] = max(dp[i-1, j], dp[i, j-1], dp[i-1, j-1] + w[i, j]), evaluated like SODA's recursion (whose
    out-of-range entries are -1), iteratively so that large videos cannot overflow the recursion limit.
    """
    rows, cols = weights.shape
    dp = np.zeros((rows, cols))
    for i in range(rows):
        for j in range(cols):
            up = dp[i - 1, j] if i > 0 else -1
            left = dp[i, j - 1] if j > 0 else -1
            diagonal = (dp[i - 1, j - 1] if i > 0 and j > 0 else 0) + weights[i, j]
            dp[i, j] = max(up, left, diagonal)
    return float(dp[-1, -1]) if rows and cols else 0.0


def soda_c(
    predictions: Mapping[str, Sequence[TimedSentence]],
    references: Sequence[Mapping[str, Sequence[TimedSentence]]],
    tokens: Mapping[str, str],
    meteor: Meteor,
) -> float:
    """SODA_c of `predictions` (already truncated); `tokens` maps every ASCII-cleaned sentence to its tokens."""
    # Collect the weighted pairs of every video first, so that METEOR runs once for all of them.
    jobs = []  # (reference index, n_gold, n_pred, tIoU matrix, positions with tIoU > 0, their pair indices)
    pairs: dict[tuple[str, str], int] = {}
    for r, reference in enumerate(references):
        for vid in sorted(reference):
            if vid not in predictions:
                continue
            preds = sorted(predictions[vid], key=lambda s: s.start)
            golds = sorted(reference[vid], key=lambda s: s.start)
            if not preds:
                jobs.append((r, len(golds), 0, None, None, None))
                continue
            ious = tiou_matrix(preds, golds).T  # (gold, prediction)
            positions = np.argwhere(ious > 0)  # tIoU 0 makes the weight 0 whatever METEOR says
            indices = [
                pairs.setdefault(
                    (tokens[remove_nonascii(golds[g].sentence)], tokens[remove_nonascii(preds[p].sentence)]),
                    len(pairs),
                )
                for g, p in positions
            ]
            jobs.append((r, len(golds), len(preds), ious, positions, indices))

    scores = meteor.sentence_scores([(gold, [pred]) for gold, pred in pairs]) if pairs else []
    f_per_reference: list[list[float]] = [[] for _ in references]
    for r, n_gold, n_pred, ious, positions, indices in jobs:
        if n_pred == 0 or n_gold == 0:
            f_per_reference[r].append(0.0)
            continue
        meteor_matrix = np.zeros_like(ious)
        for (g, p), index in zip(positions, indices, strict=False):
            meteor_matrix[g, p] = scores[index]
        score = ordered_matching_score(ious * meteor_matrix)
        precision, recall = score / n_pred, score / n_gold
        f_per_reference[r].append(
            2 * precision * recall / (precision + recall) if precision + recall > 0 else 0
        )
    return float(np.mean([np.mean(f) if f else 0.0 for f in f_per_reference]))
