"""Dense-captioning evaluator: hand-computed unit cases, identity with pycocoevalcap, and BMT's real numbers."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from pycocoevalcap.rouge.rouge import Rouge

from evaluation.densevid import DenseCaptioningEvaluator, _sum_stats, rouge_l
from evaluation.formats import TimedSentence, load_submission, parse_predictions, tiou_matrix
from evaluation.meteor import Meteor, parse_stats
from evaluation.soda import ordered_matching_score, soda_c
from tests.conftest import requires_java
from tests.densevid_reference import straightforward
from utilities.errors import InputError

REFERENCE = {
    "v1": {"timestamps": [[0, 10], [10, 20]], "sentences": ["a man runs", "a man jumps"]},
    "v2": {"timestamps": [[0, 5]], "sentences": ["a dog barks"]},
}


def seg(start, end, sentence="x"):
    return TimedSentence(float(start), float(end), sentence)


def test_tiou_hand_values():
    ious = tiou_matrix([seg(0, 10), seg(0, 1)], [seg(5, 15), seg(2, 3), seg(0, 10)])
    np.testing.assert_allclose(ious, [[5 / 15, 0.1, 1], [0, 0, 0.1]], rtol=1e-7)


def pair_up(evaluator, predictions):
    return evaluator._pair_up(predictions, evaluator._matches(predictions))


def detection(evaluator, predictions, tiou):
    return evaluator._detection(predictions, evaluator._matches(predictions), tiou)


@requires_java  # the evaluator starts METEOR when it is built
def test_pairing_and_seeded_garbage():
    evaluator = DenseCaptioningEvaluator([REFERENCE], tious=[0.3, 0.9], seed=3)
    preds = parse_predictions(
        {
            "v1": [
                {"sentence": "Man running", "timestamp": [0, 12]},
                {"sentence": "Cat", "timestamp": [50, 60]},
            ]
        }
    )
    groups, n_garbage = pair_up(evaluator, preds)
    # tIoU([0,12],[0,10]) = 10/12 and tIoU([0,12],[10,20]) = 2/20: one match at 0.3, none at 0.9.
    assert groups["v1", 0][0] == ("Man running", "a man runs")
    garbage = groups["v1", 0][1][1]
    assert (
        groups["v1", 0][1][0] == "Cat"
        and garbage.isalpha()
        and garbage.islower()
        and 10 <= len(garbage) <= 20
    )
    assert groups["v1", 1][0][1] != "a man runs" and groups["v1", 1][1] == ("Cat", garbage)
    assert n_garbage == 2 and ("v2", 0) not in groups
    again, _ = pair_up(DenseCaptioningEvaluator([REFERENCE], tious=[0.3, 0.9], seed=3), preds)
    assert again == groups


@requires_java  # the evaluator starts METEOR when it is built
def test_pairs_from_every_reference_file_at_tiou_ge():
    second = {"v1": {"timestamps": [[0, 10]], "sentences": ["someone runs"]}}
    evaluator = DenseCaptioningEvaluator([REFERENCE, second], tious=[0.5])
    groups, _ = pair_up(evaluator, parse_predictions({"v1": [{"sentence": "run", "timestamp": [0, 20]}]}))
    # tIoU([0,20],[0,10]) = 0.5 (minus 1e-8 relative): below 0.5, so garbage; [0,10] exactly matches all three.
    assert len(groups["v1", 0]) == 1 and groups["v1", 0][0][1] not in ("a man runs", "someone runs")
    groups, _ = pair_up(evaluator, parse_predictions({"v1": [{"sentence": "run", "timestamp": [0, 10]}]}))
    assert [ref for _, ref in groups["v1", 0]] == ["a man runs", "someone runs"]


@requires_java  # the evaluator starts METEOR when it is built
def test_precision_recall_strict_max_over_files_and_empty_predictions():
    second = {"v1": {"timestamps": [[30, 40]], "sentences": ["late"]}}
    evaluator = DenseCaptioningEvaluator([REFERENCE, second], tious=[0.5])
    preds = parse_predictions(
        {"v1": [{"sentence": "a", "timestamp": [0, 9]}, {"sentence": "b", "timestamp": [30, 39]}], "v2": []}
    )
    precision, recall = detection(evaluator, preds, 0.5)
    # v1: file 1 → P 1/2, R 1/2; file 2 → P 1/2, R 1; max → (1/2, 1). v2 (empty list) → (0, 0).
    assert (precision, recall) == (0.25, 0.5)
    # strict >: tIoU exactly 0.9 (minus epsilon) at threshold 0.9 does not count
    assert detection(
        evaluator, parse_predictions({"v2": [{"sentence": "c", "timestamp": [0, 4.5]}]}), 0.9
    ) == (
        0.0,
        0.0,
    )


def test_meteor_statistics_sum_skips_perfect_single_chunk():
    perfect = "7.0 7.0 4.0 4.0 3.0 3.0 4.0 4.0" + " 0.0" * 12 + " 1.0 7.0 7.0"
    partial = "6.0 7.0 2.0 4.0 1.0 1.0 1.0 1.0" + " 0.0" * 12 + " 2.0 2.0 2.0"
    (summed, alone) = _sum_stats(parse_stats([perfect, partial]), [[0, 1], [1]]).tolist()
    assert summed[:4] == [13, 14, 6, 8] and summed[20] == 2.0 and summed[21:] == [9.0, 9.0]
    assert alone == [float(v) for v in partial.split()]


SENTENCES = [
    "a man is running down a track",
    "a man runs on a track and jumps into the sand",
    "the woman is cooking in a kitchen",
    "she adds salt to the pot and stirs the pot",
    "a man is running down a track",
    "a",
    "people are watching on the side",
    "the man jumps into the sand pit and people cheer",
]


def random_pairs(rng, n):
    return [(rng.choice(SENTENCES), rng.choice(SENTENCES)) for _ in range(n)]


def test_rouge_identical_to_pycocoevalcap():
    """(BLEU and CIDEr-D: tests/test_ngram_metrics.py.)"""
    rng = random.Random(0)
    for h, r in random_pairs(rng, 100):
        assert rouge_l(h, r) == Rouge().calc_score([h], [r])


def test_ordered_matching_dp_hand_cases():
    assert ordered_matching_score(np.array([[0.5, 0.2], [0.9, 0.1]])) == pytest.approx(0.9)
    assert ordered_matching_score(np.array([[1.0, 0.0], [0.0, 1.0]])) == 2.0
    # crossing pairs cannot both be used: (0,1)+(1,0) is not ordered
    assert ordered_matching_score(np.array([[0.0, 0.6], [0.7, 0.0]])) == pytest.approx(0.7)
    assert ordered_matching_score(np.array([[0.3, 0.3, 0.3]])) == pytest.approx(0.3)


class FixedMeteor:
    def __init__(self, value):
        self.value = value

    def sentence_scores(self, pairs):
        return [self.value] * len(pairs)


def test_soda_c_hand_case():
    preds = {"v2": [seg(0, 10, "a dog barks"), seg(40, 50, "other")]}
    refs = [{"v2": [seg(0, 5, "a dog barks")]}, {"v2": [seg(100, 110, "late")]}]
    tokens = {"a dog barks": "a dog barks", "other": "other", "late": "late"}
    # file 1: weight = tIoU 0.5 × METEOR 0.4 = 0.2; P = 0.2/2, R = 0.2/1, F = 2PR/(P+R) = 0.1333; file 2: F = 0.
    assert soda_c(preds, refs, tokens, FixedMeteor(0.4)) == pytest.approx(
        (2 * 0.1 * 0.2 / 0.3 + 0) / 2, rel=1e-6
    )


@pytest.mark.parametrize(
    ("results", "message"),
    [
        (
            {"v1": [{"sentence": "a", "timestamp": [1]}]},
            "video 'v1', prediction 0: 'timestamp' must be two finite",
        ),
        ({"v1": [{"sentence": "a", "timestamp": [0, float("nan")]}]}, "two finite numbers"),
        ({"v1": [{"sentence": "a", "timestamp": ["0", 1]}]}, "two finite numbers"),
        (
            {"v1": [{"sentence": "a", "timestamp": [0, 1]}, {"sentence": "b", "timestamp": [5, 2]}]},
            "prediction 1: start 5.0 > end 2.0",
        ),
        (
            {"v1": [{"sentence": 3, "timestamp": [0, 1]}]},
            "video 'v1', prediction 0: 'sentence' must be a string",
        ),
        ({"v1": [{"timestamp": [0, 1]}]}, "video 'v1', prediction 0: the key 'sentence' is missing"),
        ({"v1": [{"sentence": "a"}]}, "video 'v1', prediction 0: the key 'timestamp' is missing"),
    ],
)
def test_bad_predictions_name_video_and_index(results, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_predictions(results, "sub.json")


def test_a_missing_reference_file_names_the_flag(tmp_path):
    with pytest.raises(InputError, match=f"^--reference_paths {tmp_path / 'val_1.json'}: file not found"):
        DenseCaptioningEvaluator([tmp_path / "val_1.json"], detection_only=True)


def test_bad_submission_files(tmp_path):
    missing = tmp_path / "missing_results.json"
    missing.write_text(json.dumps({"version": "1"}))
    with pytest.raises(InputError, match="'results'"):
        load_submission(missing)
    with pytest.raises(InputError, match="cannot read"):
        load_submission(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_submission(broken)


@requires_java
def test_result_does_not_depend_on_garbage_letters_and_missing_videos_count_zero():
    results = {
        "v1": [
            {"sentence": "A man runs.", "timestamp": [0, 10]},
            {"sentence": "Café time", "timestamp": [40, 50]},
        ],
        "unknown": [{"sentence": "ignored", "timestamp": [0, 1]}],
    }
    with Meteor() as meteor:
        reports = [
            DenseCaptioningEvaluator([REFERENCE], tious=[0.5], seed=seed, meteor=meteor).evaluate(results)
            for seed in (0, 1)
        ]
    assert reports[0].metrics == reports[1].metrics
    row = reports[0].metrics["0.5"]
    assert reports[0].n_videos_without_predictions == 1 and reports[0].n_ignored_predictions == 1
    # v1: precision 1/2, recall 1/2; v2 has no predictions → 0. Mean over the two reference videos.
    assert row["Precision"] == 0.25 and row["Recall"] == 0.25
    assert 0 < row["METEOR"] < 0.6 and 0 < row["Bleu_1"] < 0.5


@requires_java
@pytest.mark.slow
def test_reproduces_official_numbers_on_bmt_predictions(shared_data):
    expected = {
        1: [21.7718, 10.5555, 4.6822, 2.0706, 10.7377, 22.5057, 42.5345, 100, 100],
        2: [20.9517, 10.1149, 4.5664, 1.9115, 11.0468, 22.4580, 40.7252, 100, 100],
    }
    names = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "Precision", "Recall"]
    with Meteor() as meteor:
        for split, values in expected.items():
            evaluator = DenseCaptioningEvaluator(
                [shared_data / "activitynet" / f"val_{split}_no_missings.json"], tious=[0.5], meteor=meteor
            )
            submission = shared_data / "bmt_predictions" / f"captioning_results_val_{split}_e26.json"
            row = evaluator.evaluate(load_submission(submission)).metrics["0.5"]
            assert [round(100 * row[m], 4) for m in names] == values, f"val_{split}"


@requires_java
@pytest.mark.slow
def test_matches_the_official_algorithm_on_perturbed_real_predictions(shared_data, tmp_path):
    """Several tIoUs, two reference files, unmatched, truncated, missing and unknown predictions, non-ASCII:
    the evaluator equals a direct implementation of the official algorithm (tests/densevid_reference.py)."""
    rng = random.Random(1)
    refs = [
        json.loads((shared_data / "activitynet" / f"val_{i}_no_missings.json").read_text()) for i in (1, 2)
    ]
    submitted = shared_data / "bmt_predictions" / "captioning_results_val_1_e26.json"
    results = json.loads(submitted.read_text())["results"]
    videos = sorted(results)[:120]
    paths = []
    for i, ref in enumerate(refs):
        paths.append(tmp_path / f"ref{i}.json")
        paths[-1].write_text(json.dumps({vid: ref[vid] for vid in videos if vid in ref}))
    submission = {}
    for vid in videos[10:]:  # the first 10 reference videos have no predictions
        predictions = []
        for p in results[vid]:
            start, end = p["timestamp"]
            shift = rng.choice([0.0, 0.0, 0.15, 0.4, 2.0]) * (end - start)  # some match only at low tIoUs
            predictions.append({"sentence": p["sentence"], "timestamp": [start + shift, end + shift]})
        submission[vid] = predictions
    submission[videos[10]][0]["sentence"] = "A caf\u00e9 owner says \u201chello\u201d to a capital T."
    submission["v_unknown_video"] = [{"sentence": "ignored", "timestamp": [0, 1]}]
    (tmp_path / "sub.json").write_text(json.dumps({"results": submission}))
    setting = (tmp_path / "sub.json", paths, [0.3, 0.5, 0.7, 0.9], 3, 0)

    expected = straightforward(*setting)
    with DenseCaptioningEvaluator(paths, tious=[0.3, 0.5, 0.7, 0.9], max_proposals=3, seed=7) as evaluator:
        report = evaluator.evaluate(submission)
    assert report.metrics == expected
    assert report.n_videos_without_predictions == 10 and report.n_ignored_predictions == 1
    assert report.extra["garbage_references"] > 0
