"""BLEU statistics and CIDEr-D of many (hypothesis, reference) pairs at once, bit-identical to pycocoevalcap.

The dense-captioning evaluator scores each video's pairs as one pycocoevalcap `compute_score` call per metric,
and the same pairs recur across tIoUs and reference files. Here every distinct sentence is split into its
n-grams once (as integer ids, in `precook` order), every distinct pair's n-gram overlap is found once, and
CIDEr-D of all videos is computed in a few array operations. Each floating-point operation of pycocoevalcap's
`CiderScorer` is kept in the same order: the sums it accumulates term by term use `np.bincount`, which also adds
its weights one by one in input order, and logarithms and length penalties use the same scalar expressions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NGRAMS = 4
CIDER_SIGMA = 6.0
SENTINEL = np.iinfo(np.int64).max  # a search key larger than any real one


class PairNgrams:
    """The n-grams of distinct tokenised (hypothesis, reference) pairs as flat arrays."""

    def __init__(self, pairs: Sequence[tuple[str, str]]):
        index: dict[str, int] = {}
        hyps = [index.setdefault(hyp, len(index)) for hyp, _ in pairs]
        refs = [index.setdefault(ref, len(index)) for _, ref in pairs]
        self.n_pairs = len(pairs)
        self.hyps, self.refs = np.array(hyps, dtype=np.int64), np.array(refs, dtype=np.int64)
        self.n_words, self.offsets, self.ids, self.orders, self.counts, self.n_ngrams = _encode(list(index))
        # Each hypothesis n-gram of each pair, with the count of the same n-gram in the pair's reference.
        self.hyp_entries, self.hyp_pair = _gather(self.offsets, self.hyps)
        ref_entries, ref_pair = _gather(self.offsets, self.refs)
        self.hyp_ref_counts = _lookup(
            ref_pair * self.n_ngrams + self.ids[ref_entries],
            self.counts[ref_entries],
            self.hyp_pair * self.n_ngrams + self.ids[self.hyp_entries],
        )

    def bleu_counts(self) -> np.ndarray:
        """(n_pairs, 10) BleuScorer statistics: test length, reference length, guesses 1-4, correct 1-4."""
        test_len, ref_len = self.n_words[self.hyps], self.n_words[self.refs]
        guess = np.maximum(0, test_len[:, None] - np.arange(NGRAMS)[None, :])
        clipped = np.minimum(self.counts[self.hyp_entries], self.hyp_ref_counts)
        slot = self.hyp_pair * NGRAMS + self.orders[self.hyp_entries]
        correct = np.bincount(slot, weights=clipped, minlength=self.n_pairs * NGRAMS).reshape(-1, NGRAMS)
        return np.column_stack([test_len, ref_len, guess, correct.astype(np.int64)])

    def cider_d(self, groups: Sequence[Sequence[int]]) -> np.ndarray:
        """pycocoevalcap CIDEr-D (`Cider().compute_score`) of each group of pair indices; an empty group is 0."""
        sizes = np.array([len(group) for group in groups], dtype=np.int64)
        result = np.zeros(len(groups))
        if sizes.sum() == 0:
            return result
        pair = np.concatenate([np.asarray(group, dtype=np.int64) for group in groups if len(group)])
        group = np.repeat(np.arange(len(groups)), sizes)
        n = len(pair)

        # Document frequency of each n-gram in its group: how many of the group's pairs have it in the reference.
        ref_entries, ref_owner = _gather(self.offsets, self.refs[pair])
        df_keys, df_values = np.unique(
            group[ref_owner] * self.n_ngrams + self.ids[ref_entries], return_counts=True
        )
        df_keys, df_values = np.append(df_keys, SENTINEL), np.append(df_values, 0)
        log_df = np.array([np.log(max(1.0, float(d))) for d in range(int(df_values.max()) + 1)])
        ref_len = np.array([np.log(float(size)) if size else 0.0 for size in sizes])

        def idf(owner: np.ndarray, ngram_ids: np.ndarray) -> np.ndarray:
            """log(#pairs) − log(max(1, df)) of each entry, as `counts2vec` computes it."""
            keys = group[owner] * self.n_ngrams + ngram_ids
            position = np.searchsorted(df_keys, keys)
            df = np.where(df_keys[position] == keys, df_values[position], 0)
            return ref_len[group[owner]] - log_df[df]

        def norms(owner: np.ndarray, orders: np.ndarray, vec: np.ndarray) -> np.ndarray:
            squares = np.bincount(owner * NGRAMS + orders, weights=vec**2, minlength=n * NGRAMS)
            return np.sqrt(squares).reshape(n, NGRAMS)

        hyp_rows, hyp_owner = _gather(_offsets_of(self.hyp_pair, self.n_pairs), pair)
        hyp_entries = self.hyp_entries[hyp_rows]
        weight = idf(hyp_owner, self.ids[hyp_entries])
        vec_hyp = self.counts[hyp_entries] * weight
        vec_ref_same = self.hyp_ref_counts[hyp_rows] * weight  # the reference's weight of the same n-gram
        vec_ref = self.counts[ref_entries] * idf(ref_owner, self.ids[ref_entries])
        norm_hyp = norms(hyp_owner, self.orders[hyp_entries], vec_hyp)
        norm_ref = norms(ref_owner, self.orders[ref_entries], vec_ref)

        slot = hyp_owner * NGRAMS + self.orders[hyp_entries]
        products = np.minimum(vec_hyp, vec_ref_same) * vec_ref_same
        val = np.bincount(slot, weights=products, minlength=n * NGRAMS).reshape(n, NGRAMS)
        nonzero = (norm_hyp != 0) & (norm_ref != 0)
        val = np.where(nonzero, val / np.where(nonzero, norm_hyp * norm_ref, 1.0), val)
        bigrams = np.maximum(self.n_words - 1, 0)  # pycocoevalcap's "length": the count of 2-grams
        delta = (bigrams[self.hyps[pair]] - bigrams[self.refs[pair]]).tolist()
        penalty = {d: np.e ** (-(float(d) ** 2) / (2 * CIDER_SIGMA**2)) for d in set(delta)}
        val = val * np.array([penalty[d] for d in delta])[:, None]
        pair_scores = np.mean(val, axis=1) * 10.0

        bounds = np.concatenate([[0], np.cumsum(sizes)])
        for g in np.flatnonzero(sizes):
            result[g] = np.mean(pair_scores[bounds[g] : bounds[g + 1]])
        return result


def corpus_bleu(total: Sequence[int]) -> list[float]:
    """BLEU-1..4 as BleuScorer.compute_score(option='closest') gives them for one-reference pairs, from the
    pairs' summed `bleu_counts` (test length, reference length, guesses 1-4, correct 1-4)."""
    tiny, small = 1e-15, 1e-9
    testlen, reflen, guess, correct = total[0], total[1], total[2:6], total[6:10]
    bleus, bleu = [], 1.0
    for k in range(NGRAMS):
        bleu *= float(correct[k] + tiny) / (guess[k] + small)
        bleus.append(bleu ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        bleus = [b * math.exp(1 - 1 / ratio) for b in bleus]
    return bleus


def _encode(sentences: list[str]) -> tuple[np.ndarray, ...]:
    """Word counts and the distinct 1-4-grams of each sentence with their counts, in `precook` order (by n, then
    by first position). N-grams are integer ids: a k-gram is (its (k−1)-gram prefix, its last word)."""
    words: dict[str, int] = {}
    tokens: list[int] = []
    n_words = []
    for sentence in sentences:
        split = sentence.split()
        n_words.append(len(split))
        tokens += [words.setdefault(w, len(words)) for w in split]
    lengths, token = np.array(n_words, dtype=np.int64), np.array(tokens, dtype=np.int64)
    sentence_of = np.repeat(np.arange(len(sentences)), lengths)
    position = np.arange(len(token)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    remaining = lengths[sentence_of] - position  # words from this position to the end of the sentence

    parts = []  # (sentence, order, position, n-gram id) of every n-gram occurrence
    prefix, first_id = token, 0
    for k in range(1, NGRAMS + 1):
        at = np.flatnonzero(remaining >= k)
        code = token[at] if k == 1 else prefix[at] * max(1, len(words)) + token[at + k - 1]
        distinct, level_id = np.unique(code, return_inverse=True)
        parts.append((sentence_of[at], np.full(len(at), k - 1), position[at], first_id + level_id))
        prefix = np.full(len(token), -1, dtype=np.int64)
        prefix[at] = level_id
        first_id += len(distinct)
    sentence, order, pos, ngram = (np.concatenate(column) for column in zip(*parts, strict=True))
    occurrence = np.lexsort((pos, order, sentence))
    keys = sentence[occurrence] * first_id + ngram[occurrence]
    _, first, count = np.unique(keys, return_index=True, return_counts=True)
    by_first = np.argsort(first)
    entries = occurrence[first[by_first]]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(sentence[entries], minlength=len(sentences)))])
    counts = count[by_first].astype(np.float64)
    return lengths, offsets, ngram[entries], order[entries], counts, max(first_id, 1)


def _offsets_of(owner: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n))])


def _gather(offsets: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions of the entries of `items` (each item's entries `offsets[i]:offsets[i+1]`), in order, and
    the index in `items` each position belongs to."""
    starts, sizes = offsets[items], offsets[items + 1] - offsets[items]
    owner = np.repeat(np.arange(len(items)), sizes)
    first = np.repeat(np.cumsum(sizes) - sizes, sizes)
    return starts[owner] + np.arange(len(owner)) - first, owner


def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """values[keys == w] for each w in `wanted` (keys are unique), 0 where absent."""
    order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_values = np.append(keys[order], SENTINEL), np.append(values[order], 0)
    position = np.searchsorted(sorted_keys, wanted)
    return np.where(sorted_keys[position] == wanted, sorted_values[position], 0)
