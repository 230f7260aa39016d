"""Tokenisation and the vocabulary: hand-built examples, save/load, and the real train.csv."""

from __future__ import annotations

import json

import pytest

from datasets.captioning.activitynet import read_captions_csv
from datasets.vocabulary import Vocabulary, build_vocabulary, tokenize
from utilities.errors import InputError


def test_tokenize_lowercases_spacy_tokens():
    assert tokenize(["A man isn't running, he's walking", "Two  dogs"]) == [
        ["a", "man", "is", "n't", "running", ",", "he", "'s", "walking"],
        ["two", "dogs"],
    ]


def test_specials_first_then_descending_frequency_ties_alphabetical():
    vocab = build_vocabulary(["b a c", "a B", "d a"])
    # counts: a 3, b 2, c 1, d 1 (c before d)
    assert vocab.itos == ["<unk>", "<blank>", "<s>", "</s>", "a", "b", "c", "d"]
    assert (vocab.unk_idx, vocab.pad_idx, vocab.start_idx, vocab.end_idx) == (0, 1, 2, 3)
    assert build_vocabulary(["b a c", "a B", "d a"], min_freq=2).itos[4:] == ["a", "b"]


def test_encode_decode():
    vocab = build_vocabulary(["a man runs"])
    ids = vocab.encode(["a", "dog", "runs"])
    assert ids == [2, vocab.stoi["a"], 0, vocab.stoi["runs"], 3]
    assert vocab.decode([*ids, 1, 1]) == "a <unk> runs"


def test_save_load_round_trip_and_line_format(tmp_path):
    vocab = build_vocabulary(["a man runs"])
    vocab.save(tmp_path / "vocab.json")
    assert json.loads((tmp_path / "vocab.json").read_text()) == vocab.to_list()
    assert Vocabulary.load(tmp_path / "vocab.json") == vocab
    # the original's unk ' UNK ' survives the one-token-per-line format
    (tmp_path / "vocab.txt").write_text(" UNK \n<blank>\n<s>\n</s>\nthe\n")
    loaded = Vocabulary.load(tmp_path / "vocab.txt")
    assert loaded.unk_token == " UNK " and loaded.stoi["the"] == 4


def test_bad_vocabulary_files(tmp_path):
    (tmp_path / "dup.json").write_text(json.dumps(["<unk>", "<blank>", "<s>", "</s>", "a", "a"]))
    with pytest.raises(InputError, match=r"dup\.json: token 'a' appears twice \(ids 4 and 5\)"):
        Vocabulary.load(tmp_path / "dup.json")
    with pytest.raises(InputError, match=r"absent\.json: cannot read: No such file"):
        Vocabulary.load(tmp_path / "absent.json")


def test_real_train_vocabulary_size(shared_data):
    captions = [s.caption for s in read_captions_csv(shared_data / "activitynet" / "train.csv").segments]
    vocab = build_vocabulary(captions)
    # The original had 10,172 with spaCy 2.0.12; spaCy 3.8's tokenizer gives 10,173.
    assert abs(len(vocab) - 10172) <= 3
    assert vocab.itos[4:8] == ["the", "a", "and", "in"]
