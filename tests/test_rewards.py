"""RL rewards: METEOR 1.5 of sentences and prefixes equal to the evaluator's METEOR, CIDEr-D equal to
pycocoevalcap's with the same document frequencies, batching and caching."""

from __future__ import annotations

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from evaluation.meteor import Meteor
from evaluation.rewards import (
    CiderReward,
    MeteorReward,
    build_reward,
    hypothesis_text,
    reference_tokens,
)
from tests.conftest import requires_java
from utilities.errors import InputError

REFERENCES = [
    "a man is running down a track",
    "a woman cooks food in a kitchen",
    "the dog barks at the cat",
    "people dance on a stage",
]
HYPOTHESES = [
    "a man runs on a track",
    "she cooks food",
    "a dog is barking",
    "a group of people are dancing on a stage",
]


@pytest.fixture(scope="module")
def meteor():
    with Meteor() as m:
        yield m


@requires_java
def test_prefix_rewards_equal_meteor_computed_directly(meteor):
    reward = MeteorReward(meteor)
    tokens = ["a", "man", ",", "runs", "on", "a", "track", "."]
    prefix_scores = reward.sentence(
        [hypothesis_text(tokens[: t + 1]) for t in range(len(tokens))], [REFERENCES[0]] * len(tokens)
    )
    expected = [
        meteor.sentence_scores([(hypothesis_text(tokens[: t + 1]), [REFERENCES[0]])])[0]
        for t in range(len(tokens))
    ]
    assert prefix_scores.tolist() == expected
    assert prefix_scores[2] == prefix_scores[1]  # punctuation is not a word
    assert prefix_scores[-2] > prefix_scores[0] > 0


@requires_java
def test_batched_and_cached(meteor, monkeypatch):
    reward = MeteorReward(meteor)
    exchanges = []
    stats = meteor.stats
    monkeypatch.setattr(meteor, "stats", lambda pairs: exchanges.append(len(pairs)) or stats(pairs))
    first = reward.sentence(HYPOTHESES + HYPOTHESES, REFERENCES + REFERENCES)
    assert exchanges == [4]  # one exchange, each distinct pair once
    again = reward.sentence(HYPOTHESES[::-1], REFERENCES[::-1])
    assert exchanges == [4] and again.tolist() == first[:4][::-1].tolist()
    assert reward.hits == 8 and reward.misses == 4
    assert first.tolist()[:4] == meteor.sentence_scores(
        [(h, [r]) for h, r in zip(HYPOTHESES, REFERENCES, strict=True)]
    )


@requires_java
def test_references_tokenised_as_in_evaluation():
    assert reference_tokens(["A man, running.", "The dog's bone"]) == ["a man running", "the dog 's bone"]


def test_cider_d_equals_pycocoevalcap_with_the_same_document_frequencies():
    reward = CiderReward(REFERENCES)
    ours = reward.sentence(HYPOTHESES, REFERENCES)
    gts = {i: [ref] for i, ref in enumerate(REFERENCES)}
    res = {i: [hyp] for i, hyp in enumerate(HYPOTHESES)}
    _, theirs = Cider().compute_score(gts, res)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    assert reward.sentence([REFERENCES[0]], [REFERENCES[0]])[0] > ours.max()


def test_cache_is_bounded():
    reward = CiderReward(REFERENCES)
    reward.cache_size = 3
    reward.sentence(HYPOTHESES, REFERENCES)
    assert len(reward._cache) == 3


def test_bad_reward_name_and_missing_references():
    with pytest.raises(InputError, match="--rl_reward"):
        build_reward("bleu", None, REFERENCES)
    with pytest.raises(InputError, match="training references"):
        CiderReward([])


@requires_java
def test_references_meteor_cannot_parse_raw_still_score(meteor):
    refs = reference_tokens(["a man ||| runs", "a man\nruns", "", "a man runs"])
    scores = MeteorReward(meteor).sentence(["a man runs"] * 4, refs)
    assert refs[0] == "a man | | | runs"  # as the evaluator tokenises it: a protocol delimiter no more
    assert scores[1] == scores[3] == 1.0 and scores[2] == 0.0 and 0 < scores[0] < 1
