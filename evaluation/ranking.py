"""Label-ranking metrics of LR²PPO: NDCG@k per clip, averaged over clips, and pair accuracy.

NDCG@k of one clip: rank its labels by predicted score, then
    DCG@k(g) = Σ_{i=1}^{min(k, n)} (2^{g_i} − 1) / log2(i + 1)      (gain 2^rel − 1, position 1 discounted by 1)
    NDCG@k  = DCG@k(gold levels in predicted order) / DCG@k(gold levels sorted descending).
When the ideal DCG is 0 (no relevant label in the clip) the ratio is undefined; `empty_ideal` says what it
counts as: 1 as LR²PPO and LightGBM do, 0 as allRank and scikit-learn do. Exactly equal predicted scores are
ordered by label position, the label that comes first in the clip's list first (a stable descending sort), so
the metric is deterministic; the original left the order to `torch.sort`.

Pure NumPy on purpose: `--procedure eval --task ranking` scores a predictions file without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utilities.errors import InputError
from utilities.files import read_json

NDCG_CUTOFFS: dict[str, int | None] = {
    "NDCG@1": 1,
    "NDCG@3": 3,
    "NDCG@5": 5,
    "NDCG@10": 10,
    "NDCG@20": 20,
    "NDCG@all": None,  # every label of the clip; the model-selection metric
}
SELECTION_METRIC = "NDCG@all"


def predicted_order(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Label positions by descending score; equal scores keep list order (earlier label ranked higher)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def dcg(levels_in_rank_order: np.ndarray, k: int | None) -> float:
    """DCG@k of relevance levels listed in rank order (k=None: all)."""
    levels = np.asarray(levels_in_rank_order, dtype=np.float64)[:k]
    discounts = np.log2(np.arange(2, len(levels) + 2))
    return float(np.sum((np.exp2(levels) - 1.0) / discounts))


def clip_ndcg(
    scores: Sequence[float] | np.ndarray, targets: Sequence[float] | np.ndarray, empty_ideal: float = 1.0
) -> dict[str, float]:
    """{"NDCG@1": …, …, "NDCG@all": …} of one clip; `targets` are the gold relevance levels (0 = low)."""
    targets = np.asarray(targets, dtype=np.float64)
    if len(targets) != len(scores) or len(targets) == 0:
        raise ValueError(
            f"need one score per target and at least one label, got {len(scores)}/{len(targets)}"
        )
    ranked = targets[predicted_order(scores)]
    ideal = np.sort(targets)[::-1]
    result = {}
    for name, k in NDCG_CUTOFFS.items():
        best = dcg(ideal, k)
        result[name] = dcg(ranked, k) / best if best > 0 else float(empty_ideal)
    return result


def mean_ndcg(per_clip: Sequence[dict[str, float]]) -> dict[str, float | int]:
    """The metrics JSON: each NDCG@k averaged over clips (arithmetic mean), plus "clips": their number."""
    if not per_clip:
        raise ValueError("no clips to average")
    metrics: dict[str, float | int] = {
        name: float(np.mean([clip[name] for clip in per_clip])) for name in NDCG_CUTOFFS
    }
    metrics["clips"] = len(per_clip)
    return metrics


def pair_accuracy(chosen: Sequence[float] | np.ndarray, rejected: Sequence[float] | np.ndarray) -> float:
    """Fraction of comparisons whose chosen item scores strictly higher than the rejected one (a tie counts
    as wrong, as in the original's reward validation)."""
    chosen, rejected = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    if chosen.shape != rejected.shape or chosen.size == 0:
        raise ValueError(f"need equally many chosen/rejected scores, got {chosen.shape}/{rejected.shape}")
    return float(np.mean(chosen > rejected))


def clip_case(
    clip_id: str,
    tags: Sequence[str],
    scores: Sequence[float] | np.ndarray,
    targets: Sequence[float] | np.ndarray,
    empty_ideal: float = 1.0,
) -> dict:
    """One entry of the cases JSON: the clip's scores in its own label order, its NDCG, and its labels in
    predicted order, each with its gold level and score."""
    scores = [float(s) for s in scores]
    if not len(tags) == len(scores) == len(targets):
        raise ValueError(f"clip {clip_id}: {len(tags)} tags, {len(scores)} scores, {len(targets)} targets")
    return {
        "id": clip_id,
        "scores": scores,
        "ndcg": clip_ndcg(scores, targets, empty_ideal),
        "predict": [
            {"tag": tags[i], "target": _plain(targets[i]), "score": scores[i]}
            for i in predicted_order(scores)
        ],
    }


def _plain(level: float) -> int | float:
    """A relevance level as JSON shows it: integral levels as ints."""
    level = float(level)
    return int(level) if level.is_integer() else level


# --- the predictions file -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipPrediction:
    id: str | int
    scores: list[float]
    targets: list[float]


def read_predictions(path: str | Path) -> list[ClipPrediction]:
    """Read `[{"id": …, "scores": [...], "targets": [...]}, …]`; every problem is an InputError naming the
    entry (its position and id). Ids must be unique: a clip listed twice would count twice in the mean."""
    entries = read_json(path)
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{path}: expected a non-empty JSON list of {{id, scores, targets}} entries")
    predictions, seen = [], {}
    for n, entry in enumerate(entries):
        where = f"{path}: entry {n}"
        if not isinstance(entry, dict):
            raise InputError(
                f"{where}: expected an object with id, scores, targets, got {type(entry).__name__}"
            )
        missing = [key for key in ("id", "scores", "targets") if key not in entry]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)}")
        clip_id = entry["id"]
        if not isinstance(clip_id, str | int) or isinstance(clip_id, bool):
            raise InputError(f"{where}: id must be a string or an integer, got {clip_id!r}")
        where = f"{path}: entry {n} (id {clip_id!r})"
        if clip_id in seen:
            raise InputError(f"{where}: the same id as entry {seen[clip_id]}")
        seen[clip_id] = n
        scores = _numbers(entry["scores"], "scores", where)
        targets = _numbers(entry["targets"], "targets", where)
        if len(scores) != len(targets):
            raise InputError(f"{where}: {len(scores)} scores but {len(targets)} targets")
        if not scores:
            raise InputError(f"{where}: no labels (empty scores and targets)")
        if any(t < 0 for t in targets):
            raise InputError(f"{where}: targets are relevance levels and must be ≥ 0, got {targets}")
        predictions.append(ClipPrediction(clip_id, scores, targets))
    return predictions


def _numbers(values: object, field: str, where: str) -> list[float]:
    if not isinstance(values, list):
        raise InputError(f"{where}: {field} must be a list of numbers, got {type(values).__name__}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise InputError(f"{where}: {field}[{i}] is {v!r}, not a finite number")
    return [float(v) for v in values]


def match_gold(
    predictions: Sequence[ClipPrediction],
    gold: Mapping[str, Sequence[float]],
    predictions_path: str | Path,
    gold_path: str | Path,
) -> list[ClipPrediction]:
    """The predictions of the gold clip list's clips, in its order (`gold`: clip id → its labels' relevance
    levels). Every gold clip must be scored once with the gold's targets, and nothing else: a dropped clip would
    change the mean (a hard clip left out raises NDCG), so an unknown, missing or disagreeing clip is an error."""
    by_id: dict[str, ClipPrediction] = {}
    for p in predictions:
        clip_id = str(p.id)  # clip lists read ids as strings
        if clip_id in by_id:
            raise InputError(
                f"{predictions_path}: ids {by_id[clip_id].id!r} and {p.id!r} both name clip {clip_id}"
            )
        if clip_id not in gold:
            raise InputError(f"{predictions_path}: clip {clip_id} is not in the gold clip list {gold_path}")
        targets = [float(t) for t in gold[clip_id]]
        if len(p.scores) != len(targets):
            raise InputError(
                f"{predictions_path}: clip {clip_id} has {len(p.scores)} scores but {gold_path} lists "
                f"{len(targets)} labels for it"
            )
        if p.targets != targets:
            raise InputError(
                f"{predictions_path}: clip {clip_id}: targets {_levels(p.targets)} disagree with "
                f"{_levels(targets)} in {gold_path}"
            )
        by_id[clip_id] = p
    missing = [clip_id for clip_id in gold if clip_id not in by_id]
    if missing:
        raise InputError(
            f"{predictions_path}: no scores for clip {missing[0]} of the gold clip list {gold_path} "
            f"({len(missing)} of its {len(gold)} clips missing)"
        )
    return [by_id[clip_id] for clip_id in gold]


def _levels(targets: Sequence[float]) -> list[int | float]:
    return [_plain(t) for t in targets]


def score_predictions(
    predictions: Sequence[ClipPrediction], empty_ideal: float = 1.0
) -> dict[str, float | int]:
    """The metrics JSON of a predictions file: NDCG@k averaged over its clips, and the number of clips."""
    return mean_ndcg([clip_ndcg(p.scores, p.targets, empty_ideal) for p in predictions])
