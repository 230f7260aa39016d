"""Sentence-level rewards for RL on captions: METEOR 1.5 (the metric the papers report) and CIDEr-D.

A training step asks for thousands of scores: every sampled caption, and for hierarchical credit every prefix
of it. Both rewards take a whole batch of (hypothesis, reference) pairs at once and remember what they have
scored (the same greedy captions and prefixes recur step after step): METEOR answers all uncached pairs of a
batch in two exchanges with the evaluator's long-lived METEOR process (statistics, then `EVAL`), never one call
per token.

Tokenisation follows evaluation: references are PTB-tokenised once, when the reward is built (one Java call for
all of them), punctuation removed, as the evaluator does. Hypotheses are the agent's vocabulary tokens, already
split and lower-cased; they are joined with single spaces without the PTB punctuation tokens, which is what the
PTB tokenizer makes of such a sequence. METEOR (`-norm`) normalises both sides once more.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

from evaluation.meteor import Meteor
from evaluation.ngram_metrics import CIDER_SIGMA, NGRAMS
from evaluation.tokenizer import PUNCTUATIONS, ptb_tokenize_documents
from utilities.errors import InputError

REWARDS = ("meteor", "cider")


def reference_tokens(captions: Sequence[str]) -> list[str]:
    """References as the evaluator sees them: PTB-tokenised, lower-cased, punctuation removed (one Java call)."""
    return ptb_tokenize_documents([list(captions)])[0]


def hypothesis_text(tokens: Iterable[str]) -> str:
    """A hypothesis of vocabulary tokens as the evaluator would tokenise it."""
    return " ".join(token for token in tokens if token not in PUNCTUATIONS)


class SentenceReward:
    """Scores of (hypothesis, reference) pairs, cached (least recently used pairs are forgotten first)."""

    name = "reward"

    def __init__(self, cache_size: int = 1_000_000):
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.hits = self.misses = 0

    def sentence(self, hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        """The reward of each hypothesis against its reference (both tokenised, space-separated)."""
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
        pairs = list(zip(hyps, refs, strict=True))
        todo = list(dict.fromkeys(pair for pair in pairs if pair not in self._cache))
        self.hits += len(pairs) - len(todo)
        self.misses += len(todo)
        for pair, score in zip(todo, self._score(todo), strict=True):
            if not math.isfinite(score):
                raise ValueError(f"{self.name} of {pair} is {score}")
            self._cache[pair] = float(score)
        scores = np.array([self._cache[pair] for pair in pairs], dtype=np.float64)
        for pair in pairs:
            self._cache.move_to_end(pair)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return scores

    def _score(self, pairs: list[tuple[str, str]]) -> Sequence[float]:
        raise NotImplementedError


class MeteorReward(SentenceReward):
    """Sentence METEOR 1.5 through a shared `Meteor` process (the evaluator's: one JVM per run)."""

    name = "METEOR"

    def __init__(self, meteor: Meteor, cache_size: int = 1_000_000):
        super().__init__(cache_size)
        self.meteor = meteor

    def _score(self, pairs: list[tuple[str, str]]) -> Sequence[float]:
        return self.meteor.sentence_scores([(hyp, [ref]) for hyp, ref in pairs]) if pairs else []


class CiderReward(SentenceReward):
    """CIDEr-D of a hypothesis against one reference, with document frequencies from the training references
    (each reference one document), as in self-critical sequence training: pycocoevalcap's CiderD formula
    (tf-idf n-gram vectors for n = 1..4, clipped overlap, Gaussian length penalty σ = 6, ×10)."""

    name = "CIDEr-D"

    def __init__(self, train_references: Sequence[str], cache_size: int = 1_000_000):
        super().__init__(cache_size)
        if not train_references:
            raise InputError("CIDEr-D rewards need the training references for their document frequencies")
        self.document_frequency: Counter[tuple[str, ...]] = Counter()
        for ref in train_references:
            self.document_frequency.update(set(_ngrams(ref.split())))
        self.log_documents = math.log(float(len(train_references)))

    def _score(self, pairs: list[tuple[str, str]]) -> Sequence[float]:
        return [self._cider_d(hyp.split(), ref.split()) for hyp, ref in pairs]

    def _cider_d(self, hyp: list[str], ref: list[str]) -> float:
        vec_hyp, norm_hyp = self._vector(hyp)
        vec_ref, norm_ref = self._vector(ref)
        delta = float(max(len(hyp) - 1, 0) - max(len(ref) - 1, 0))  # pycocoevalcap's lengths count 2-grams
        penalty = math.exp(-(delta**2) / (2 * CIDER_SIGMA**2))
        total = 0.0
        for n in range(NGRAMS):
            overlap = sum(
                min(w, vec_ref[n].get(g, 0.0)) * vec_ref[n].get(g, 0.0) for g, w in vec_hyp[n].items()
            )
            if norm_hyp[n] != 0 and norm_ref[n] != 0:
                overlap /= norm_hyp[n] * norm_ref[n]
            total += overlap * penalty
        return total / NGRAMS * 10.0

    def _vector(self, words: list[str]) -> tuple[list[dict], list[float]]:
        """tf-idf weight of each n-gram, per n, and the norm of each n's vector."""
        vectors: list[dict] = [{} for _ in range(NGRAMS)]
        for gram, count in Counter(_ngrams(words)).items():
            df = max(1.0, float(self.document_frequency.get(gram, 0)))
            vectors[len(gram) - 1][gram] = count * (self.log_documents - math.log(df))
        norms = [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]
        return vectors, norms


def _ngrams(words: list[str]) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for n in range(1, NGRAMS + 1) for i in range(len(words) - n + 1)]


def build_reward(name: str, meteor: Meteor | None, train_references: Sequence[str]) -> SentenceReward:
    """`--rl_reward {meteor,cider}`: METEOR needs the run's METEOR process, CIDEr-D the training references."""
    if name == "meteor":
        if meteor is None:
            raise ValueError("METEOR rewards need a Meteor process")
        return MeteorReward(meteor)
    if name == "cider":
        return CiderReward(train_references)
    raise InputError(f"--rl_reward must be one of {', '.join(REWARDS)}, got {name!r}")
