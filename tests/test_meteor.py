"""The METEOR 1.5 process wrapper: answers, batching, restart, timeouts, missing Java."""

from __future__ import annotations

import shutil
import threading

import pytest

from evaluation.meteor import JavaError, Meteor, sanitize

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")


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
    (aggregate,) = meteor.aggregate([meteor.stats(pairs)])
    assert 0 < aggregate < 1


def test_delimiter_and_newlines_are_sanitised(meteor):
    assert sanitize("a ||| b\nc") == "a b c"
    (score,) = meteor.sentence_scores([("a man ||| runs\n", ["a man runs"])])
    assert score > 0.9


def test_dead_process_is_restarted(meteor):
    meteor._proc.kill()
    meteor._proc.wait()
    assert meteor.sentence_scores([("a dog", ["a dog"])])[0] > 0.5


def test_thread_safe(meteor):
    results = {}

    def work(i):
        results[i] = meteor.sentence_scores([(f"a man number {i}", [f"a man number {i}"])])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(v > 0.9 for v in results.values())


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
