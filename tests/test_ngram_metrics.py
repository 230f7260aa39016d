"""The array-based BLEU statistics and CIDEr-D are bit-identical to pycocoevalcap's per-group scorers."""

from __future__ import annotations

import json
import random

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from evaluation.ngram_metrics import PairNgrams, corpus_bleu


def as_dicts(group):
    gts = {i: [ref] for i, (_, ref) in enumerate(group)}
    res = {i: [hyp] for i, (hyp, _) in enumerate(group)}
    return gts, res


def ours(groups):
    """Score `groups` of (hyp, ref) pairs the way the evaluator does: distinct pairs once, then per group."""
    pairs = list(dict.fromkeys(pair for group in groups for pair in group))
    index = {pair: i for i, pair in enumerate(pairs)}
    members = [[index[pair] for pair in group] for group in groups]
    ngrams = PairNgrams(pairs)
    counts = ngrams.bleu_counts()
    bleu = [corpus_bleu(counts[m].sum(axis=0).tolist()) for m in members]
    return bleu, ngrams.cider_d(members).tolist()


def reference(groups):
    bleu = [Bleu(4).compute_score(*as_dicts(group), verbose=0)[0] for group in groups]
    cider = [Cider().compute_score(*as_dicts(group))[0] for group in groups]
    return bleu, cider


def random_groups(rng: random.Random, n_groups: int):
    words = [
        "a",
        "man",
        "the",
        "woman",
        "is",
        "are",
        "playing",
        "guitar",
        "dog",
        "runs",
        "on",
        "in",
        "park",
        "field",
        "ball",
    ]
    sentences = [" ".join(rng.choices(words, k=rng.randint(1, 14))) for _ in range(80)]
    return [
        [(rng.choice(sentences), rng.choice(sentences)) for _ in range(rng.randint(1, 8))]
        for _ in range(n_groups)
    ]


def test_bit_identical_on_random_groups():
    groups = random_groups(random.Random(0), 300)
    assert ours(groups) == reference(groups)


def test_bit_identical_on_real_captions(shared_data):
    refs = json.loads((shared_data / "activitynet" / "val_1_no_missings.json").read_text())
    submission = shared_data / "bmt_predictions" / "captioning_results_val_1_e26.json"
    results = json.loads(submission.read_text())["results"]
    groups = []
    for vid in sorted(results)[:300]:
        hyps = [p["sentence"].lower().strip(" .") for p in results[vid]]
        gts = [s.lower().strip(" .") for s in refs[vid]["sentences"]]
        groups.append([(h, r) for h in hyps for r in gts])
    assert ours(groups) == reference(groups)


def test_hand_computed_values():
    # BLEU counts of "a dog runs" against "a dog": 3 words vs 2; guesses 3, 2, 1, 0; correct 2, 1, 0, 0.
    counts = PairNgrams([("a dog runs", "a dog")]).bleu_counts()
    assert counts.tolist() == [[3, 2, 3, 2, 1, 0, 2, 1, 0, 0]]
    # CIDEr-D: one pair alone gives every n-gram df 1 = the number of pairs, so all weights are 0 → 0.
    assert PairNgrams([("a dog runs", "a dog runs")]).cider_d([[0], []]).tolist() == [0.0, 0.0]
    # Two pairs with disjoint references: the identical pair has cosine 1 in every order (score 10), the
    # unrelated one 0, so the group's CIDEr-D is their mean, 5.
    pairs = [("a dog runs fast", "a dog runs fast"), ("x y z w", "the cat sits down")]
    assert np.isclose(PairNgrams(pairs).cider_d([[0, 1]])[0], 5.0)
