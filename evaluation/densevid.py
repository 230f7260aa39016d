"""The ActivityNet Captions dense-captioning evaluator with the official semantics, made fast.

Semantics: those of ranjaykrishna/densevid_eval at 9d4045a (the "2021" evaluator that BMT ports to Python 3):
- for each tIoU, every prediction (the first `max_proposals` of its video, in submission order) is paired with
  every reference segment, of any reference file, with tIoU >= t; a prediction that matches nothing is paired
  with a single-token garbage reference (random lowercase letters, seeded here; the scores do not depend on the
  letters);
- captions lose their non-ASCII characters (each becomes a space) and are PTB-tokenised;
- BLEU-1..4, METEOR, ROUGE-L and CIDEr-D are computed per reference video over that video's pairs (CIDEr-D's
  document frequencies come from the video's references alone) and averaged over all reference videos, a video
  without pairs scoring 0;
- precision/recall use tIoU > t, per reference file, the max over files, averaged over reference videos;
- the reported average is the plain mean over the tIoUs.
Deviation: a video with an empty prediction list gets precision 0 (the original reuses a stale loop variable).

Speed: the same (prediction, reference) pairs recur across tIoUs and reference files, so the tokenizer runs
once (one JVM for the official per-tIoU documents), each distinct tokenised pair is scored once (METEOR
statistics, BLEU n-gram counts, ROUGE-L) and per video only cheap aggregations remain: BLEU from summed counts,
METEOR from summed statistics (METEOR's aggregate is a function of them: one `EVAL` of all the videos'
summed statistics), CIDEr-D with the video's document frequencies. The tIoU matrices are
computed once for pairing and detection. Every aggregation repeats pycocoevalcap's floating-point operations in
the same order, so the numbers are identical to the per-video pycocoevalcap calls (checked in tests and the
benchmark).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.formats import (
    TimedSentence,
    Videos,
    load_reference,
    parse_predictions,
    parse_reference,
    remove_nonascii,
    tiou_matrix,
)
from evaluation.meteor import Meteor, parse_stats, perfect_segments
from evaluation.ngram_metrics import NGRAMS, PairNgrams, corpus_bleu
from evaluation.soda import soda_c
from evaluation.tokenizer import ptb_tokenize_documents
from utilities.errors import InputError

AVERAGE_KEY = "Average across tIoUs"


@dataclass
class Report:
    """Metrics in the official layout plus where they came from."""

    metrics: dict[str, dict[str, float]]
    reference_names: list[str]
    n_reference_videos: int
    n_videos_without_predictions: int
    n_ignored_videos: int
    n_ignored_predictions: int
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)

    def provenance(self) -> str:
        return (
            f"references: {', '.join(self.reference_names)} | reference videos: {self.n_reference_videos} | "
            f"videos without predictions: {self.n_videos_without_predictions} | ignored (unknown ids): "
            f"{self.n_ignored_predictions} predictions of {self.n_ignored_videos} videos | garbage seed: {self.seed}"
        )


def format_table(report: Report) -> str:
    """One row per tIoU plus the average, values ×100 with 4 decimals."""
    names = list(report.metrics[AVERAGE_KEY])
    header = ["tIoU", *names]
    rows = [[key, *(f"{100 * row[m]:.4f}" for m in names)] for key, row in report.metrics.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        " | ".join(cell.rjust(width) for cell, width in zip(r, widths, strict=False)) for r in [header, *rows]
    ]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


# ---- per-pair and per-video scoring ---------------------------------------------------------------------------
def rouge_l(hyp: str, ref: str, beta: float = 1.2) -> float:
    """pycocoevalcap's ROUGE-L of one pair (same formula), with a bit-parallel LCS length."""
    candidate, reference = hyp.split(" "), ref.split(" ")
    lcs = _lcs_length(reference, candidate)
    precision, recall = lcs / float(len(candidate)), lcs / float(len(reference))
    if precision != 0 and recall != 0:
        return ((1 + beta**2) * precision * recall) / float(recall + beta**2 * precision)
    return 0.0


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (Hyyrö's bit-vector algorithm)."""
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


class _PairTable:
    """Distinct (hypothesis, reference) pairs after tokenisation, each with an index."""

    def __init__(self) -> None:
        self.ids: dict[tuple[str, str], int] = {}
        self.pairs: list[tuple[str, str]] = []

    def add(self, hyp: str, ref: str) -> int:
        key = (hyp, ref)
        if key not in self.ids:
            self.ids[key] = len(self.pairs)
            self.pairs.append(key)
        return self.ids[key]


# ---- the evaluator ---------------------------------------------------------------------------------------------
class DenseCaptioningEvaluator:
    """Official dense-captioning metrics for in-memory predictions against fixed reference files.

    Keep one instance for a whole training run: it holds the METEOR process (one JVM start) and the parsed
    references. `evaluate()` takes the `results` mapping of a submission.
    """

    def __init__(
        self,
        references: Sequence[str | Path | Mapping[str, Any]],
        tious: Sequence[float] = (0.3, 0.5, 0.7, 0.9),
        max_proposals: int = 100,
        soda: bool = False,
        seed: int = 0,
        java: str | None = None,
        meteor: Meteor | None = None,
        detection_only: bool = False,
    ):
        if not references:
            raise InputError("at least one reference file is needed")
        if not tious:
            raise InputError("at least one tIoU is needed")
        duplicates = sorted({float(t) for t in tious if list(map(float, tious)).count(float(t)) > 1})
        if duplicates:
            raise InputError(f"duplicate tIoUs {duplicates}: each threshold must be given once")
        if max_proposals < 1:
            raise InputError(f"max_proposals must be positive, got {max_proposals}")
        self.java = java
        self._meteor = meteor
        self._owns_meteor = meteor is None
        if not detection_only:  # `detection` needs no METEOR
            self.meteor.start()  # the JVM loads for seconds: let it do so while the references are read
        self.reference_names = [
            str(r) if isinstance(r, (str, Path)) else f"<reference {i}>" for i, r in enumerate(references)
        ]
        self.references = [
            load_reference(r) if isinstance(r, (str, Path)) else parse_reference(r, name)
            for r, name in zip(references, self.reference_names, strict=False)
        ]
        self.video_ids = sorted(set().union(*self.references))
        self.tious = [float(t) for t in tious]
        self.max_proposals = max_proposals
        self.soda = soda
        self.seed = seed

    @property
    def meteor(self) -> Meteor:
        if self._meteor is None:
            self._meteor = Meteor(java=self.java)
        return self._meteor

    def close(self) -> None:
        if self._owns_meteor and self._meteor is not None:
            self._meteor.close()
            self._meteor = None

    def __enter__(self) -> DenseCaptioningEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def evaluate(self, results: Mapping[str, Any], source: str = "predictions") -> Report:
        """Score `{vid: [{"sentence", "timestamp"}, ...]}` (a submission's `results`)."""
        predictions = parse_predictions(results, source)
        reference_ids = set(self.video_ids)
        ignored = [vid for vid in predictions if vid not in reference_ids]
        predictions = {vid: p[: self.max_proposals] for vid, p in predictions.items() if vid in reference_ids}
        self.meteor.start()  # (re)starts the JVM if it is not running

        matches = self._matches(predictions)
        groups, garbage = self._pair_up(predictions, matches)
        # The official tokenises each tIoU's hypotheses and references as two documents (videos in order, here
        # sorted); a line's tokens can depend on the next line, so those documents are kept as they are.
        documents = []
        for t_index in range(len(self.tious)):
            pairs = [pair for vid in self.video_ids for pair in groups.get((vid, t_index), [])]
            documents += [[hyp for hyp, _ in pairs], [ref for _, ref in pairs]]
        if self.soda:
            documents.append(list(dict.fromkeys(_soda_sentences(predictions, self.references))))
        tokenized = ptb_tokenize_documents(documents, java=self.java)
        table = _PairTable()
        group_ids = {}
        for t_index in range(len(self.tious)):
            hyps, refs = iter(tokenized[2 * t_index]), iter(tokenized[2 * t_index + 1])
            for vid in self.video_ids:
                if (vid, t_index) in groups:
                    group_ids[vid, t_index] = tuple(
                        table.add(next(hyps), next(refs)) for _ in groups[vid, t_index]
                    )

        detection = {}

        def python_side() -> None:  # runs while METEOR (Java) scores the pairs
            for tiou in self.tious:
                detection[tiou] = self._detection(predictions, matches, tiou)

        scores = self._score_groups(table, group_ids, python_side, f"METEOR of {source}")
        metrics: dict[str, dict[str, float]] = {}
        for t_index, tiou in enumerate(self.tious):
            per_video = [scores.get(group_ids.get((vid, t_index))) for vid in self.video_ids]
            bleu = np.mean([s["bleu"] if s else [0] * NGRAMS for s in per_video], axis=0)
            row = {f"Bleu_{k + 1}": float(bleu[k]) for k in range(NGRAMS)}
            for name, key in (("METEOR", "meteor"), ("ROUGE_L", "rouge"), ("CIDEr", "cider")):
                row[name] = float(np.mean([s[key] if s else 0 for s in per_video]))
            row["Precision"], row["Recall"] = detection[tiou]
            metrics[str(tiou)] = row
        if self.soda:
            tokens = dict(zip(documents[-1], tokenized[-1], strict=True))
            value = soda_c(predictions, self.references, tokens, self.meteor)
            for row in metrics.values():
                row["SODA_c"] = value
        names = list(next(iter(metrics.values())))
        metrics[AVERAGE_KEY] = {m: sum(row[m] for row in metrics.values()) / len(self.tious) for m in names}
        return Report(
            metrics=metrics,
            reference_names=self.reference_names,
            n_reference_videos=len(self.video_ids),
            n_videos_without_predictions=sum(vid not in predictions for vid in self.video_ids),
            n_ignored_videos=len(ignored),
            n_ignored_predictions=sum(len(results[vid]) for vid in ignored),
            seed=self.seed,
            extra={"garbage_references": garbage},
        )

    def detection(
        self, results: Mapping[str, Any], source: str = "predictions"
    ) -> dict[str, dict[str, float]]:
        """The detection half alone (no captions are scored, no Java): Precision, Recall and their F1 per tIoU,
        and under `AVERAGE_KEY` the mean Precision and Recall with the F1 of those two means (BMT's proposal
        model selection). Sentences may be empty: proposals are timestamps."""
        predictions = parse_predictions(results, source)
        predictions = {
            vid: p[: self.max_proposals] for vid, p in predictions.items() if vid in set(self.video_ids)
        }
        matches = self._matches(predictions)
        metrics = {}
        for tiou in self.tious:
            precision, recall = self._detection(predictions, matches, tiou)
            metrics[str(tiou)] = {"Precision": precision, "Recall": recall, "F1": f1_score(precision, recall)}
        precision = sum(row["Precision"] for row in metrics.values()) / len(self.tious)
        recall = sum(row["Recall"] for row in metrics.values()) / len(self.tious)
        metrics[AVERAGE_KEY] = {"Precision": precision, "Recall": recall, "F1": f1_score(precision, recall)}
        return metrics

    # ---- pairing -------------------------------------------------------------------------------------------
    def _matches(self, predictions: Videos) -> dict[str, list[tuple[np.ndarray, list[TimedSentence]]]]:
        """Per reference video, for each reference file that has it: (tIoU of its predictions × the file's
        segments, those segments). Shared by the pairing and the detection metrics."""
        return {
            vid: [
                (tiou_matrix(predictions.get(vid, []), reference[vid]), reference[vid])
                for reference in self.references
                if vid in reference
            ]
            for vid in self.video_ids
        }

    def _pair_up(
        self, predictions: Videos, matches: dict[str, list[tuple[np.ndarray, list[TimedSentence]]]]
    ) -> tuple[dict[tuple[str, int], list[tuple[str, str]]], int]:
        """(video, tIoU index) → [(hyp, ref)] in the official order; unmatched predictions get garbage."""
        rng = random.Random(self.seed)
        garbage: dict[tuple[str, int], str] = {}
        groups: dict[tuple[str, int], list[tuple[str, str]]] = {}
        for vid in self.video_ids:
            preds = predictions.get(vid)
            if not preds:
                continue
            hyps = [remove_nonascii(p.sentence) for p in preds]
            sentences = [(ious, [remove_nonascii(r.sentence) for r in refs]) for ious, refs in matches[vid]]
            for t_index, tiou in enumerate(self.tious):
                pairs = []
                for j, hyp in enumerate(hyps):
                    before = len(pairs)
                    for ious, refs in sentences:
                        pairs += [(hyp, refs[g]) for g in np.flatnonzero(ious[j] >= tiou)]
                    if len(pairs) == before:
                        if (vid, j) not in garbage:
                            length = rng.randint(10, 20)
                            garbage[vid, j] = "".join(
                                rng.choice(string.ascii_lowercase) for _ in range(length)
                            )
                        pairs.append((hyp, garbage[vid, j]))
                groups[vid, t_index] = pairs
        return groups, len(garbage)

    # ---- caption metrics -------------------------------------------------------------------------------------
    def _score_groups(
        self, table: _PairTable, group_ids: dict, meanwhile: Callable[[], None], desc: str
    ) -> dict[tuple[int, ...], dict[str, Any]]:
        """Scores of every distinct group of pairs: {pair ids: {bleu, meteor, rouge, cider}}.

        METEOR's statistics come from Java in a background thread (its progress shown under `desc`) while Python
        computes the other metrics and then calls `meanwhile`."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            pairs = [(hyp, [ref]) for hyp, ref in table.pairs]
            meteor_stats = pool.submit(self.meteor.stats, pairs, desc)
            distinct = list(set(group_ids.values()))
            ngrams = PairNgrams(table.pairs)
            bleu = _group_sums(ngrams.bleu_counts(), distinct).tolist()
            cider = ngrams.cider_d(distinct)
            rouge_scores = np.array([rouge_l(hyp, ref) for hyp, ref in table.pairs])
            scores: dict[tuple[int, ...], dict[str, Any]] = {
                ids: {
                    "bleu": corpus_bleu(bleu[g]),
                    "rouge": np.mean(rouge_scores[list(ids)]),
                    "cider": cider[g],
                }
                for g, ids in enumerate(distinct)
            }
            meanwhile()
            stats = meteor_stats.result()
        meteor = self.meteor.segment_scores(_sum_stats(parse_stats(stats), distinct))
        for ids, score in zip(distinct, meteor.tolist(), strict=True):
            scores[ids]["meteor"] = score
        return scores

    # ---- detection -----------------------------------------------------------------------------------------
    def _detection(
        self,
        predictions: Videos,
        matches: dict[str, list[tuple[np.ndarray, list[TimedSentence]]]],
        tiou: float,
    ) -> tuple[float, float]:
        """Precision and recall at tIoU > t: per reference file, max over files, mean over reference videos."""
        precision, recall = [], []
        for vid in self.video_ids:
            n_preds = len(predictions.get(vid, []))
            best_precision = best_recall = 0.0
            for ious, refs in matches[vid]:
                hit = ious > tiou
                if n_preds:
                    best_precision = max(best_precision, float(hit.any(axis=1).sum()) / n_preds)
                if refs:
                    best_recall = max(best_recall, float(hit.any(axis=0).sum()) / len(refs))
            precision.append(best_precision)
            recall.append(best_recall)
        return sum(precision) / len(precision), sum(recall) / len(recall)


def f1_score(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _group_sums(values: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Row sums of `values` over each group of row indices (whole numbers here, so exact in any order)."""
    members = np.concatenate([np.asarray(group, dtype=np.int64) for group in groups])
    starts = np.cumsum([0] + [len(group) for group in groups[:-1]])
    return np.add.reduceat(values[members], starts, axis=0)


def _soda_sentences(predictions: Videos, references: Sequence[Videos]) -> Iterable[str]:
    """Every ASCII-cleaned sentence SODA_c looks up."""
    for segments in [
        *predictions.values(),
        *(segs for reference in references for segs in reference.values()),
    ]:
        for segment in segments:
            yield remove_nonascii(segment.sentence)


def _sum_stats(values: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """METEOR statistics of each group of segments summed as METEOR's `MeteorStats.addStats` does it.

    The fields are: test/reference length, test/reference function words, 4 stages × (test content, reference
    content, test function, reference function) matches, chunks, test/reference word matches. addStats sums
    them all except the chunk of a segment that matches completely in a single chunk. The values are whole
    numbers, so the order of the additions does not matter.
    """
    values = values.copy()
    values[perfect_segments(values), 20] = 0.0
    return _group_sums(values, groups)
