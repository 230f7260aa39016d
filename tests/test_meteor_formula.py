"""`score_from_stats` against METEOR 1.5's own `EVAL`: the same doubles, to the last bit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import evaluation.meteor as meteor_module
from evaluation.meteor import Meteor, score_from_stats, stats_line

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")

EDGE_CASES = [
    [0.0] * 23,  # empty hypothesis and reference
    [5.0, 6.0, 2.0, 3.0] + [0.0] * 19,  # no match
    [4.0, 4.0, 1.0, 1.0, 3.0, 3.0, 1.0, 1.0] + [0.0] * 12 + [1.0, 4.0, 4.0],  # all matched, one chunk
    [4.0, 4.0, 1.0, 1.0, 3.0, 3.0, 1.0, 1.0] + [0.0] * 12 + [2.0, 4.0, 4.0],  # all matched, two chunks
    [4.0, 5.0, 1.0, 1.0, 3.0, 3.0, 1.0, 1.0] + [0.0] * 12 + [1.0, 4.0, 4.0],  # one chunk, a word short
    [1.0, 1.0, 0.0, 0.0, 1.0, 1.0] + [0.0] * 14 + [1.0, 1.0, 1.0],  # one word
    [3.0, 3.0, 3.0, 3.0, 0.0, 0.0, 2.0, 2.0] + [0.0] * 12 + [2.0, 2.0, 2.0],  # function words only
    [6.0, 9.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0] + [0.0] * 8 + [2.0, 5.0, 0.0, 0.0, 1.0, 2.0, 5.0],  # paraphrase
    [2.0, 2.0, 0.0, 0.0]
    + [0.0] * 4
    + [1.0, 1.0, 0.0, 0.0] * 2
    + [0.0] * 4
    + [2.0, 2.0, 2.0],  # stem, synonym
]


def random_stats(rng: np.random.Generator, n: int) -> np.ndarray:
    """Consistent statistics of n segments: matches within the lengths, chunks within the matches."""
    stats = np.zeros((n, 23))
    lengths = rng.integers(1, 40, size=(n, 2))
    function = rng.integers(0, lengths + 1)
    stats[:, 0:2], stats[:, 2:4] = lengths, function
    # matches per side: content ones within the content words, function ones within the function words
    content_words, function_words = np.min(lengths - function, axis=1), np.min(function, axis=1)
    content_matches = rng.integers(np.minimum(content_words, 1), content_words + 1)
    function_matches = rng.integers(0, function_words + 1)
    content_matches[rng.random(n) < 0.1] = 0  # no match at all
    function_matches[content_matches == 0] = 0
    for column, matches in ((4, content_matches), (6, function_matches)):
        stages = rng.multinomial(matches, [0.7, 0.1, 0.1, 0.1])
        stats[:, column:20:4] = stages  # test side
        stats[:, column + 1 : 20 : 4] = stages  # reference side
    # paraphrases match phrases of different lengths: some extra reference words where there is room
    room = lengths[:, 1] - function[:, 1] - content_matches
    extra = rng.integers(0, room + 1) * (stats[:, 16] > 0)
    stats[:, 17] += extra
    stats[:, 21] = stats[:, 4:20:4].sum(axis=1) + stats[:, 6:20:4].sum(axis=1)
    stats[:, 22] = stats[:, 5:20:4].sum(axis=1) + stats[:, 7:20:4].sum(axis=1)
    matched = stats[:, 21] > 0
    stats[matched, 20] = rng.integers(1, np.minimum(stats[matched, 21], stats[matched, 22]) + 1)
    # perfect segments: everything matched in one chunk
    perfect = rng.random(n) < 0.1
    stats[perfect, 0:2] = stats[perfect, 21:23]
    stats[perfect, 2:4] = stats[perfect][:, [6, 7]] + stats[perfect][:, [10, 11]]
    stats[perfect, 2:4] += stats[perfect][:, [14, 15]] + stats[perfect][:, [18, 19]]
    stats[perfect & matched, 20] = 1.0
    return stats


def summed_stats(rng: np.random.Generator, stats: np.ndarray, n: int) -> np.ndarray:
    """Sums over n random groups, as MeteorStats.addStats adds segments (no chunk for a perfect one)."""
    test_total = stats[:, 4:20:4].sum(axis=1) + stats[:, 6:20:4].sum(axis=1)
    ref_total = stats[:, 5:20:4].sum(axis=1) + stats[:, 7:20:4].sum(axis=1)
    perfect = (test_total == stats[:, 0]) & (ref_total == stats[:, 1]) & (stats[:, 20] == 1)
    counted = stats.copy()
    counted[perfect, 20] = 0.0
    sizes = rng.integers(2, 60, size=n)
    return np.array([counted[rng.choice(len(stats), size)].sum(axis=0) for size in sizes])


def lines(stats: np.ndarray) -> list[str]:
    return [stats_line(row) for row in stats]


@pytest.fixture(scope="module")
def meteor():
    with Meteor() as m:
        yield m


def test_scores_equal_java_eval_bit_for_bit(meteor):
    rng = np.random.default_rng(0)
    segments = random_stats(rng, 3000)
    stats = np.concatenate([np.array(EDGE_CASES), segments, summed_stats(rng, segments, 1000)])
    python = score_from_stats(stats)
    java = np.array(meteor.java_segment_scores(lines(stats)))
    decided = ~np.isnan(python)
    assert decided.mean() > 0.95 and decided[: len(EDGE_CASES)].all()
    assert np.array_equal(python[decided].view(np.int64), java[decided].view(np.int64))
    assert (java[:2] == 0.0).all() and java[2] == 1.0  # sanity of the edge cases themselves


# 55 chunks over 58 + 59 matched words: Math.pow(110/117, 0.2) is not correctly rounded in Java
TIE_ROW = [58.0, 59.0, 0.0, 0.0, 57.0, 57.0] + [0.0] * 10 + [1.0, 2.0, 0.0, 0.0, 55.0, 58.0, 59.0]


def test_pow_ties_are_left_to_java():
    (score,) = score_from_stats(np.array([TIE_ROW]))
    assert np.isnan(score)


def test_segment_scores_equal_java_including_the_rows_left_to_it(meteor):
    rng = np.random.default_rng(1)
    stats = np.concatenate([[TIE_ROW], random_stats(rng, 500)])
    java = np.array(meteor.java_segment_scores(lines(stats)))
    assert np.array_equal(meteor.segment_scores(stats).view(np.int64), java.view(np.int64))
    assert meteor.sentence_scores([("a man runs", ["a man runs"])]) == [
        meteor.java_segment_scores(meteor.stats([("a man runs", ["a man runs"])]))[0]
    ]


def test_unverified_platforms_take_every_score_from_java(meteor, monkeypatch):
    stats = random_stats(np.random.default_rng(2), 50)
    java = np.array(meteor.java_segment_scores(lines(stats)))
    monkeypatch.setattr(meteor_module, "score_from_stats", lambda values: pytest.fail("Python formula used"))
    monkeypatch.setattr(meteor_module, "POW_VERIFIED", False)
    assert np.array_equal(meteor.segment_scores(stats), java)
