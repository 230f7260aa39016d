"""NDCG@k and pair accuracy (evaluation/ranking.py) and `main.py --procedure eval --task ranking`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from evaluation.ranking import (
    NDCG_CUTOFFS,
    ClipPrediction,
    clip_case,
    clip_ndcg,
    pair_accuracy,
    predicted_order,
    read_predictions,
    score_predictions,
)
from main import main
from tests.conftest import REPO
from utilities.errors import InputError

METRIC_KEYS = ["NDCG@1", "NDCG@3", "NDCG@5", "NDCG@10", "NDCG@20", "NDCG@all", "clips"]
LOG3 = math.log2(3)


def test_ndcg_hand_computed():
    # predicted order: labels 0, 1, 2 → gold levels 0, 2, 1 → gains 0, 3, 1; ideal order 2, 1, 0 → gains 3, 1, 0
    ndcg = clip_ndcg([0.9, 0.8, 0.1], [0, 2, 1])
    dcg, ideal = 0 + 3 / LOG3 + 1 / 2, 3 + 1 / LOG3
    assert ndcg["NDCG@1"] == 0.0
    for name in ("NDCG@3", "NDCG@5", "NDCG@10", "NDCG@20", "NDCG@all"):
        assert ndcg[name] == pytest.approx(dcg / ideal)
    assert dcg / ideal == pytest.approx(0.6590, abs=1e-4)


def test_ndcg_cutoff_between_lengths():
    # 4 labels, k = 3: the 4th ranked label (level 2) is cut off from the DCG but counts in the ideal
    ndcg = clip_ndcg([4, 3, 2, 1], [1, 1, 0, 2])
    dcg3 = 1 + 1 / LOG3 + 0
    ideal3 = 3 + 1 / LOG3 + 1 / 2
    assert ndcg["NDCG@3"] == pytest.approx(dcg3 / ideal3)
    assert ndcg["NDCG@1"] == pytest.approx(1 / 3)
    dcg_all = dcg3 + 3 / math.log2(5)
    ideal_all = ideal3
    assert ndcg["NDCG@all"] == pytest.approx(dcg_all / ideal_all)


def test_ties_are_broken_by_label_position_earlier_first():
    assert list(predicted_order([1.0, 2.0, 1.0, 2.0])) == [1, 3, 0, 2]
    # labels 0 and 1 tie; label 0 (irrelevant) comes first in the list, so it is ranked first
    ndcg = clip_ndcg([0.5, 0.5, 0.0], [0, 2, 0])
    assert ndcg["NDCG@1"] == 0.0
    assert ndcg["NDCG@all"] == pytest.approx((3 / LOG3) / 3)
    # the same labels listed the other way round: now the relevant one wins the tie
    assert clip_ndcg([0.5, 0.5, 0.0], [2, 0, 0])["NDCG@1"] == 1.0


@pytest.mark.parametrize("empty_ideal", [0.0, 1.0])
def test_empty_ideal_convention(empty_ideal):
    ndcg = clip_ndcg([0.3, 0.2, 0.1], [0, 0, 0], empty_ideal=empty_ideal)
    assert set(ndcg.values()) == {empty_ideal}
    # a relevant label below the cut-off leaves the ideal DCG@k > 0: a real 0, whatever the convention
    assert clip_ndcg([0.3, 0.2], [0, 1], empty_ideal=empty_ideal)["NDCG@1"] == 0.0


def test_mean_over_clips_and_clip_count():
    predictions = [
        {"id": "a", "scores": [0.9, 0.8, 0.1], "targets": [0, 2, 1]},
        {"id": "b", "scores": [1.0, 0.0], "targets": [0, 0]},
    ]
    for empty_ideal in (0, 1):
        metrics = score_predictions(_parsed(predictions), empty_ideal)
        assert list(metrics) == METRIC_KEYS
        assert metrics["clips"] == 2
        assert metrics["NDCG@all"] == pytest.approx((0.6590 + empty_ideal) / 2, abs=1e-4)


def test_equal_to_scikit_learn_where_conventions_coincide():
    ndcg_score = pytest.importorskip("sklearn.metrics").ndcg_score
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 30))
        targets = rng.integers(0, 3, size=n)
        scores = rng.permutation(n) + rng.uniform(0, 0.5, size=n)  # distinct: scikit-learn averages ties
        empty_ideal = 0.0  # scikit-learn gives 0 when no label is relevant
        ours = clip_ndcg(scores, targets, empty_ideal)
        gains = (2.0**targets - 1)[None, :]
        for name, k in NDCG_CUTOFFS.items():
            if n == 1:
                continue  # scikit-learn refuses single-document queries
            assert ours[name] == pytest.approx(ndcg_score(gains, scores[None, :], k=k)), (name, n)


def test_pair_accuracy_counts_ties_as_wrong():
    assert pair_accuracy([1.0, 2.0, 0.5, 3.0], [0.0, 2.0, 1.0, 1.0]) == 0.5
    with pytest.raises(ValueError):
        pair_accuracy([], [])


def test_clip_case_layout():
    case = clip_case("c1", ["dog", "sea", "car"], [0.1, 0.7, 0.7], [0, 2, 1])
    assert list(case) == ["id", "scores", "ndcg", "predict"]
    assert case["scores"] == [0.1, 0.7, 0.7]  # the clip's own label order
    assert list(case["ndcg"]) == METRIC_KEYS[:-1]
    assert case["predict"] == [
        {"tag": "sea", "target": 2, "score": 0.7},
        {"tag": "car", "target": 1, "score": 0.7},
        {"tag": "dog", "target": 0, "score": 0.1},
    ]
    assert case["ndcg"]["NDCG@all"] == 1.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"id": "a"}, "non-empty JSON list"),
        ([], "non-empty JSON list"),
        ([["a", [1], [1]]], "entry 0: expected an object"),
        ([{"id": "a", "scores": [1]}], "entry 0: missing targets"),
        ([{"id": "a", "scores": [1, 2], "targets": [1]}], "entry 0 (id 'a'): 2 scores but 1 targets"),
        ([{"id": "a", "scores": [], "targets": []}], "no labels"),
        ([{"id": "a", "scores": [1, None], "targets": [0, 1]}], "scores[1] is None"),
        ([{"id": "a", "scores": [1, float("nan")], "targets": [0, 1]}], "scores[1] is nan"),
        ([{"id": "a", "scores": [1], "targets": ["2"]}], "targets[0] is '2'"),
        ([{"id": "a", "scores": [1], "targets": [-1]}], "must be ≥ 0"),
        ([{"id": [1], "scores": [1], "targets": [1]}], "id must be"),
        (
            [{"id": "a", "scores": [1], "targets": [1]}, {"id": "a", "scores": [1], "targets": [1]}],
            "entry 1 (id 'a'): the same id as entry 0",
        ),
    ],
)
def test_predictions_file_errors_name_the_entry(tmp_path, content, message):
    path = tmp_path / "P.json"
    path.write_text(json.dumps(content))
    with pytest.raises(InputError) as error:
        read_predictions(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)


def _parsed(entries):
    return [ClipPrediction(e["id"], e["scores"], e["targets"]) for e in entries]


def _run_main(tmp_path, *flags):
    code = "import sys, main; rc = main.main(sys.argv[1:]); print('torch' in sys.modules); sys.exit(rc)"
    return subprocess.run(
        [sys.executable, "-c", code, "--procedure", "eval", "--log_dir", str(tmp_path / "log"), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_eval_cli_writes_the_metrics_json_without_torch(tmp_path):
    predictions = [
        {"id": "a", "scores": [0.9, 0.8, 0.1], "targets": [0, 2, 1]},
        {"id": 7, "scores": [1.0, 0.0], "targets": [0, 0]},
    ]
    (tmp_path / "P.json").write_text(json.dumps(predictions))
    for empty_ideal, expected in (("1", (0.6590 + 1) / 2), ("0", 0.6590 / 2)):
        out = tmp_path / f"M{empty_ideal}.json"
        flags = [
            "--task",
            "ranking",
            "--ranking_predictions",
            str(tmp_path / "P.json"),
            "--metrics_out",
            str(out),
        ]
        result = _run_main(tmp_path, *flags, "--ndcg_empty_ideal", empty_ideal)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == "False"  # torch never imported
        metrics = json.loads(out.read_text())
        assert list(metrics) == METRIC_KEYS
        assert metrics["clips"] == 2
        assert metrics["NDCG@all"] == pytest.approx(expected, abs=1e-4)


def test_eval_cli_errors_on_one_line(tmp_path):
    (tmp_path / "P.json").write_text(json.dumps([{"id": "a", "scores": [1, 2], "targets": [1]}]))
    result = _run_main(tmp_path, "--task", "ranking", "--ranking_predictions", str(tmp_path / "P.json"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("main.py: error:")
    assert "entry 0 (id 'a'): 2 scores but 1 targets" in result.stderr
    result = _run_main(tmp_path, "--task", "ranking")
    assert result.returncode == 2
    assert "needs --ranking_predictions" in result.stderr


GOLD = [
    {"id": "a", "tags": [{"tag": "x", "target": 0}, {"tag": "y", "target": 2}, {"tag": "z", "target": 1}]},
    {"id": 7, "tags": [{"tag": "u", "target": 1}, {"tag": "v", "target": 0}]},
]
SCORED = [
    {"id": "a", "scores": [0.9, 0.8, 0.1], "targets": [0, 2, 1]},  # NDCG@all 0.6590
    {"id": 7, "scores": [1.0, 0.0], "targets": [1, 0]},  # 1
]


def _eval_ranking(tmp_path, predictions, *flags):
    (tmp_path / "P.json").write_text(json.dumps(predictions))
    (tmp_path / "GOLD.json").write_text(json.dumps(GOLD))
    argv = ["--procedure", "eval", "--task", "ranking", "--log_dir", str(tmp_path / "log")]
    argv += ["--ranking_predictions", str(tmp_path / "P.json"), "--metrics_out", str(tmp_path / "M.json")]
    return main([*argv, *flags])


@pytest.mark.parametrize(
    ("predictions", "message"),
    [
        (SCORED[:1], "no scores for clip 7 of the gold clip list {gold} (1 of its 2 clips missing)"),
        ([*SCORED, {"id": "b", "scores": [1], "targets": [0]}], "clip b is not in the gold clip list {gold}"),
        (
            [SCORED[0], {**SCORED[1], "targets": [0, 1]}],
            "clip 7: targets [0, 1] disagree with [1, 0] in {gold}",
        ),
        (
            [SCORED[0], {"id": 7, "scores": [1], "targets": [1]}],
            "clip 7 has 1 scores but {gold} lists 2 labels",
        ),
        ([*SCORED, {**SCORED[1], "id": "7"}], "ids 7 and '7' both name clip 7"),
    ],
)
def test_eval_against_a_gold_clip_list_refuses_missing_unknown_and_disagreeing_clips(
    tmp_path, capsys, predictions, message
):
    assert _eval_ranking(tmp_path, predictions, "--test_path", str(tmp_path / "GOLD.json")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(gold=tmp_path / "GOLD.json") in err
    assert not (tmp_path / "M.json").exists()


def test_eval_says_where_the_targets_came_from(tmp_path, capsys):
    assert _eval_ranking(tmp_path, SCORED, "--test_path", str(tmp_path / "GOLD.json")) == 0
    out = capsys.readouterr().out
    assert f"P.json: 2 clips scored against the gold targets of {tmp_path / 'GOLD.json'}" in out
    with_gold = json.loads((tmp_path / "M.json").read_text())
    assert with_gold["NDCG@all"] == pytest.approx((0.6590 + 1) / 2, abs=1e-4) and with_gold["clips"] == 2
    assert _eval_ranking(tmp_path, SCORED) == 0
    assert (
        "P.json: 2 clips scored against the targets in the predictions file itself" in capsys.readouterr().out
    )
    assert json.loads((tmp_path / "M.json").read_text()) == with_gold
