"""Atomic writes: a finished block replaces the target (file or folder), an interrupted one leaves it as it was."""

from __future__ import annotations

import json

import pytest

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


def test_json_never_holds_nan_or_infinity(tmp_path):
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"m.json: not written: Out of range float"):
            write_json_atomic(tmp_path / "m.json", {"NDCG@all": value})
        assert not any(tmp_path.iterdir())
