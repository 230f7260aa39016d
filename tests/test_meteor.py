"""The METEOR 1.5 process wrapper: answers, batching, restart, timeouts, missing Java."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from evaluation.densevid import _sum_stats
from evaluation.meteor import LINE_BREAKS, JavaError, Meteor, parse_stats, sanitize
from tests.conftest import requires_java

pytestmark = requires_java


@pytest.fixture(scope="module")
def meteor():
    with Meteor() as m:
        yield m


def test_identical_sentence_scores_high_and_unrelated_zero(meteor):
    same, unrelated = meteor.sentence_scores([("a man is running", ["a man is running"]), ("abc", ["xyzzy"])])
    assert same > 0.9
    assert unrelated == 0.0


def test_batched_statistics_match_one_by_one(meteor):
    pairs = [("a man runs down a track", ["a man is running"]), ("she cooks", ["a woman cooks food"])]
    assert meteor.stats(pairs) == [meteor.stats([p])[0] for p in pairs]


PAIRS = [
    ("a man runs down a track", "a man is running"),
    ("she cooks", "a woman cooks food"),
    ("a man is running", "a man is running"),  # perfect: its chunk is not counted when summed
    ("the dog barks at the cat", "a dog is barking"),
    ("people dance", "a group of people are dancing on a stage"),
]


def test_summed_statistics_score_as_javas_own_aggregate(meteor):
    """A video's METEOR is the score of its summed statistics (MeteorStats.addStats): the same double as the
    aggregate line Java answers for an EVAL of the video's segments."""
    stats = meteor.stats([(hyp, [ref]) for hyp, ref in PAIRS])
    groups = [[0, 1], [2, 3, 4], [0, 2], [1, 2, 3, 4]]
    summed = meteor.segment_scores(_sum_stats(parse_stats(stats), groups))
    for group, score in zip(groups, summed, strict=True):
        (answer,) = meteor._exchange([" ||| ".join(["EVAL", *(stats[i] for i in group)])], [len(group) + 1])
        assert score == float(answer[-1])


def test_delimiter_and_line_breaks_are_sanitised(meteor):
    assert sanitize("a ||| b\nc") == "a b c"
    assert all(sanitize(f"a{c}b") == "a b" for c in LINE_BREAKS)
    hyps = [f"a man{c}runs" for c in LINE_BREAKS]
    scores = meteor.sentence_scores([*((h, ["a man runs"]) for h in hyps), ("abc", ["xyzzy"])])
    assert min(scores[:-1]) > 0.9
    assert scores[-1] == 0.0  # the last answer is still its own: nothing shifted
    (score,) = meteor.sentence_scores([("a man ||| runs\n", ["a man runs"])])
    assert score > 0.9


def test_an_interrupt_mid_exchange_does_not_leak_answers_to_the_next_call(meteor, monkeypatch):
    read_line, calls = Meteor._read_line, []

    def interrupted(self):
        calls.append(1)
        if len(calls) == 100:
            raise KeyboardInterrupt
        return read_line(self)

    monkeypatch.setattr(Meteor, "_read_line", interrupted)
    with pytest.raises(KeyboardInterrupt):
        meteor.stats([("a man is running", ["a man is running"])] * 2000)
    monkeypatch.undo()
    assert meteor.sentence_scores([("abc", ["xyzzy"])]) == [0.0]


def test_dead_process_is_restarted(meteor):
    meteor._proc.kill()
    meteor._proc.wait()
    assert meteor.sentence_scores([("a dog", ["a dog"])])[0] > 0.5


def test_thread_safe(meteor):
    """Distinct pairs with distinct scores: an answer handed to the wrong thread fails the comparison."""
    expected = meteor.sentence_scores([(hyp, [ref]) for hyp, ref in PAIRS])
    assert len(set(expected)) == len(PAIRS)
    results = {}

    def work(i):
        hyp, ref = PAIRS[i]
        results[i] = [meteor.sentence_scores([(hyp, [ref])] * 50) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PAIRS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, runs in results.items():
        assert np.array(runs).ravel().tolist() == [expected[i]] * 250


def test_missing_java_is_a_clear_error():
    with pytest.raises(JavaError, match="not found"):
        Meteor(java="/nonexistent/java")


def fake_java(tmp_path, script: str) -> str:
    """A `java` that runs `script` instead (a crash, a hang)."""
    fake = tmp_path / "java"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    return str(fake)


def test_java_failure_raises_with_stderr(tmp_path):
    java = fake_java(tmp_path, "echo 'Error: broken JVM' >&2\nexit 3")
    with Meteor(java=java, timeout=10) as m, pytest.raises(JavaError, match="broken JVM"):
        m.stats([("a", ["a"])])


def test_hanging_process_times_out(tmp_path):
    with (
        Meteor(java=fake_java(tmp_path, "exec sleep 30"), timeout=0.5) as m,
        pytest.raises(JavaError, match="no answer within"),
    ):
        m.stats([("a", ["a"])])
