"""LETOR svmlight reader (datasets/ranking/letor.py) on real MQ2008 rows and on hand-written ones; NDCG on real queries."""

from __future__ import annotations

import numpy as np
import pytest

from datasets.ranking.letor import read_letor
from evaluation.ranking import clip_ndcg
from utilities.errors import InputError


def test_hand_written_rows(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("2 qid:7 1:0.5 3:-1 #docid = A\n0 qid:7 2:1e-2\n\n1 qid:3 1:1 3:2 # docid = B inc = 1\n")
    q7, q3 = read_letor(path)
    assert (q7.qid, q3.qid) == ("7", "3")
    assert q7.labels.tolist() == [2, 0] and q3.labels.tolist() == [1]
    np.testing.assert_allclose(q7.features, [[0.5, 0, -1], [0, 0.01, 0]])
    assert q7.comments == ("docid = A", "") and q3.comments == ("docid = B inc = 1",)
    assert read_letor(path, n_features=5)[0].features.shape == (2, 5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x qid:1 1:0\n", "f.txt:1: label 'x' is not an integer"),
        ("1 1:0\n", "f.txt:1: expected 'qid:Q'"),
        ("1 qid:1 2:0 1:3\n", "f.txt:1: bad feature '1:3'"),
        ("1 qid:1 1:nan\n", "bad feature '1:nan'"),
        ("1 qid:1 0:1\n", "bad feature '0:1'"),
        ("-1 qid:1 1:1\n", "label -1 is negative"),
        ("1 qid:1 1:1\n0 qid:2 1:1\n\n2 qid:1 1:0\n", "f.txt:4: qid 1 appears again after other queries"),
        ("# only a comment\n", "no rows"),
    ],
)
def test_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "f.txt"
    path.write_text(text)
    with pytest.raises(InputError) as error:
        read_letor(path)
    assert message in str(error.value)


def test_width_beyond_n_features(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("1 qid:1 1:1\n1 qid:1 4:1\n")
    with pytest.raises(InputError, match=r"f.txt:2: feature index 4 beyond the declared width of 3$"):
        read_letor(path, n_features=3)
    with pytest.raises(InputError, match=r"f.txt:2: the widest row has 4 features but 5 are expected$"):
        read_letor(path, n_features=5, exact_width=True)


@pytest.mark.parametrize(
    # b holds 795 rows, its last without a newline (`wc -l` says 794, as the data's README does)
    ("name", "rows", "queries"),
    [("mq2008_sample_a.txt", 1000, 69), ("mq2008_sample_b.txt", 795, 36)],
)
def test_real_mq2008_rows(shared_data, name, rows, queries):
    path = shared_data / "letor" / name
    parsed = read_letor(path, n_features=46)
    assert len(parsed) == queries
    assert sum(len(q.labels) for q in parsed) == rows
    assert all(q.features.shape[1] == 46 for q in parsed)
    assert set(np.concatenate([q.labels for q in parsed]).tolist()) <= {0, 1, 2}
    first = path.read_text().splitlines()[0].split()
    assert parsed[0].qid == first[1][4:] and parsed[0].labels[0] == int(first[0])
    assert parsed[0].features[0, 0] == pytest.approx(float(first[2].split(":")[1]))
    assert parsed[0].comments[0].startswith("docid = ")


def test_ndcg_of_real_queries_matches_scikit_learn(shared_data):
    ndcg_score = pytest.importorskip("sklearn.metrics").ndcg_score
    checked = 0
    for query in read_letor(shared_data / "letor" / "mq2008_sample_a.txt"):
        scores = query.features[:, 0].astype(np.float64) + 1e-6 * np.arange(len(query.labels))  # distinct
        if len(np.unique(scores)) < len(scores) or len(scores) < 2:
            continue
        gains = (2.0**query.labels - 1)[None, :]
        for k in (1, 5, 10, None):
            assert clip_ndcg(scores, query.labels, empty_ideal=0)[f"NDCG@{k or 'all'}"] == pytest.approx(
                ndcg_score(gains, scores[None, :], k=k)
            )
        checked += 1
    assert checked > 30
