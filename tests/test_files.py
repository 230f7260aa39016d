"""Atomic writes: a finished block replaces the target (file or folder), an interrupted one leaves it as it was.
Text files users point at that are not UTF-8: one line naming the file and the first bad byte."""

from __future__ import annotations

import json

import pytest

from datasets.captioning.activitynet import CSV_COLUMNS, read_captions_csv
from datasets.ranking.letor import read_letor
from datasets.vocabulary import Vocabulary
from utilities.errors import InputError
from utilities.files import atomic_path, read_json, write_json_atomic


def test_file_is_replaced_only_when_the_block_finishes(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old", "readers see the old file until the rename"
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"], "no temporary file is left behind"


def test_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "stale.txt").write_text("x")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "half.txt").write_text("x")
        raise RuntimeError
    assert sorted(p.name for p in target.iterdir()) == ["stale.txt"]
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "fresh.txt").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["fresh.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_json_round_trip_and_clear_errors(tmp_path):
    path = write_json_atomic(tmp_path / "m.json", {"METEOR": 0.25})
    assert read_json(path) == {"METEOR": 0.25} == json.loads(path.read_text())
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match=r"bad\.json: not valid JSON"):
        read_json(tmp_path / "bad.json")


def _captions_csv(body: bytes) -> bytes:
    header = "\t".join(CSV_COLUMNS).encode() + b"\n"
    rows = b"".join(f"v_a\tA man runs.\t0.0\t1.0\t2.0\ttrain\t{i}\n".encode() for i in range(400))
    return header + rows + body  # the bad byte lies beyond the first chunk a text reader decodes


@pytest.mark.parametrize(
    ("name", "content", "read"),
    [
        ("vocab.txt", b"<unk>\n<blank>\n<s>\n</s>\n" * 3000 + b"caf\xe9\n", Vocabulary.load),
        ("train.csv", _captions_csv(b"v_b\tA caf\xe9.\t0.0\t1.0\t2.0\ttrain\t400\n"), read_captions_csv),
        ("clips.json", b'["' + b"a" * 20000 + b'\xff"]', read_json),
        ("mq.txt", b"0 qid:1 1:0.5\n" * 1000 + b"1 qid:1 1:0.5 #\xff\n", read_letor),
    ],
)
def test_a_text_file_that_is_not_utf8_is_one_line_naming_the_file_and_the_byte_offset(
    tmp_path, name, content, read
):
    path = tmp_path / name
    path.write_bytes(content)
    offset = content.index(b"\xe9" if b"\xe9" in content else b"\xff")
    with pytest.raises(InputError) as err:
        read(path)
    assert str(err.value) == (
        f"{path}: not UTF-8 text (byte 0x{content[offset]:02x} at offset {offset}); save it as UTF-8"
    )


def test_json_never_holds_nan_or_infinity(tmp_path):
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"m.json: not written: Out of range float"):
            write_json_atomic(tmp_path / "m.json", {"NDCG@all": value})
        assert not any(tmp_path.iterdir())
