"""GloVe reading (txt/zip), the binary cache, lookup (strip + lower, missing → zeros) and the embedding."""

from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest
import torch

from datasets.embeddings import cache_paths, embedding_matrix, glove_matrix, load_glove
from model.blocks import VocabularyEmbedder
from utilities.errors import InputError

GLOVE = "\n".join(
    [
        "the 1 2 3",
        "unk 4 5 6",
        "at name@domain.com 7 8 9",  # a word with a space, as in glove.840B
        "Man 10 11 12",  # case-sensitive: 'man' is not this one
        "the 13 14 15",  # a later duplicate wins
    ]
)


@pytest.fixture(params=["txt", "zip"])
def glove_file(request, tmp_path):
    if request.param == "txt":
        path = tmp_path / "glove.txt"
        path.write_text(GLOVE + "\n")
    else:
        path = tmp_path / "glove.zip"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("glove.txt", GLOVE + "\n")
    return path


def test_lookup_strips_lowercases_and_zero_fills(glove_file):
    itos = [" UNK ", "<blank>", "<s>", "</s>", "the", "man", "at name@domain.com"]
    matrix, found = glove_matrix(glove_file, itos)
    expected = np.zeros((7, 3), dtype=np.float32)
    expected[0] = [4, 5, 6]
    expected[4] = [13, 14, 15]
    expected[6] = [7, 8, 9]
    np.testing.assert_array_equal(matrix.numpy(), expected)
    assert found == 3


def test_binary_cache_is_written_once_and_used(glove_file):
    load_glove(glove_file)
    words_path, vectors_path = cache_paths(glove_file)
    assert words_path.is_file() and vectors_path.stat().st_size == 5 * 3 * 4
    glove_file.unlink()  # the cache alone suffices now
    words, vectors = load_glove(glove_file)
    assert words[2] == "at name@domain.com" and vectors.shape == (5, 3)


def test_bad_glove_files(tmp_path):
    (tmp_path / "bad.txt").write_text("the 1 2 3\nman 1 x 3\n")
    with pytest.raises(InputError, match=r"bad\.txt: line 2: non-numeric"):
        load_glove(tmp_path / "bad.txt")
    assert not cache_paths(tmp_path / "bad.txt")[0].exists()  # no half-written cache
    with pytest.raises(InputError, match="not found"):
        load_glove(tmp_path / "absent.zip")
    (tmp_path / "g.txt").write_text("the 1 2 3\n")
    with pytest.raises(InputError, match="3-d but --d_model_caps is 300"):
        embedding_matrix(str(tmp_path / "g.txt"), ["the"], 300)


def test_random_embeddings_are_seeded():
    a = embedding_matrix("random", ["a", "b"], 8, seed=1)
    assert torch.equal(a, embedding_matrix("random", ["a", "b"], 8, seed=1))
    assert not torch.equal(a, embedding_matrix("random", ["a", "b"], 8, seed=2))


def test_word_embedding_scales_by_sqrt_d_and_is_frozen_by_default():
    weights = torch.arange(12.0).reshape(3, 4)
    frozen = VocabularyEmbedder(weights)
    out = frozen(torch.tensor([[2, 0]]))
    torch.testing.assert_close(out, weights[[2, 0]][None] * math.sqrt(4))
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in VocabularyEmbedder(weights, trainable=True).parameters())
