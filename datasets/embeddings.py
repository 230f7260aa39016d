"""Word embeddings for the caption vocabulary: GloVe (`.txt` or `.zip`) or random.

Parsing the 2.2M×300 GloVe text takes minutes, so the first load writes a binary cache next to the file
(`<name>.words.txt` + `<name>.vectors.f32`, raw float32 rows); later loads memory-map the vectors and gather only the
vocabulary's rows. Lookup as in the original: each token `.strip().lower()`; a missing word gets zeros.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from utilities.errors import InputError
from utilities.files import atomic_path
from utilities.log import progress

log = logging.getLogger(__name__)


def cache_paths(glove_path: Path) -> tuple[Path, Path]:
    return glove_path.with_name(glove_path.name + ".words.txt"), glove_path.with_name(
        glove_path.name + ".vectors.f32"
    )


def _text_lines(path: Path) -> Iterator[str]:
    """The lines of a GloVe `.txt`, or of the single `.txt` member of a `.zip`."""
    if path.suffix.lower() == ".zip":
        if not zipfile.is_zipfile(path):
            raise InputError(f"{path}: not a zip archive (expected GloVe's .zip, or its .txt)")
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if n.endswith(".txt")]
            if len(members) != 1:
                raise InputError(f"{path}: expected exactly one .txt member, found {members}")
            with archive.open(members[0]) as raw:
                yield from io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
    else:
        with path.open(encoding="utf-8", errors="replace") as handle:
            yield from handle


def convert_glove(path: Path, words_path: Path, vectors_path: Path) -> None:
    """Stream the text into the cache: words one per line, vectors as raw float32 rows (constant memory).
    The vector is the last d fields of a line (a few 840B words contain spaces); d comes from the first line."""
    dim = None
    # the vectors are renamed into place before the words: a cache with its words file is complete
    with atomic_path(words_path) as tmp_words, atomic_path(vectors_path) as tmp_vectors:
        with tmp_words.open("w", encoding="utf-8") as words, tmp_vectors.open("wb") as vectors:
            lines = progress(_text_lines(path), desc=f"converting {path.name}", unit="word")
            for line_number, line in enumerate(lines, 1):
                fields = line.rstrip("\n").rstrip(" ").split(" ")
                dim = dim or len(fields) - 1
                if dim < 1:
                    raise InputError(f"{path}: line 1: not GloVe text (a word, then its vector's numbers)")
                if len(fields) < dim + 1:
                    raise InputError(f"{path}: line {line_number}: expected a word and {dim} numbers")
                try:
                    vectors.write(np.array(fields[-dim:], dtype=np.float32).tobytes())
                except ValueError:
                    raise InputError(f"{path}: line {line_number}: non-numeric vector value") from None
                words.write(" ".join(fields[:-dim]) + "\n")
        if dim is None:
            raise InputError(f"{path}: no vectors")


def load_glove(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Words and memory-mapped (N, d) vectors, through the binary cache (converted on first use)."""
    path = Path(path)
    words_path, vectors_path = cache_paths(path)
    if not (words_path.is_file() and vectors_path.is_file()):
        if not path.is_file():
            raise InputError(
                f"{path}: word embedding file not found (GloVe 840B.300d: run ./download_data.sh, or --word_emb_caps random)"
            )
        log.info("converting %s to a binary cache (once)", path)
        convert_glove(path, words_path, vectors_path)
    words = words_path.read_text(encoding="utf-8")[:-1].split("\n")
    n_values = vectors_path.stat().st_size // 4
    if n_values % len(words):
        raise InputError(f"{vectors_path}: size does not match {len(words)} words: delete the cache files")
    vectors = np.memmap(vectors_path, dtype=np.float32, mode="r", shape=(len(words), n_values // len(words)))
    return words, vectors


def glove_matrix(path: str | Path, itos: Sequence[str]) -> tuple[torch.Tensor, int]:
    """(V, d) vectors for the vocabulary and the number of tokens found; missing tokens get zeros."""
    words, vectors = load_glove(path)
    index = {w: i for i, w in enumerate(words)}  # later duplicates win
    rows = [index.get(token.strip().lower()) for token in itos]
    matrix = np.zeros((len(itos), vectors.shape[1]), dtype=np.float32)
    found = [(i, r) for i, r in enumerate(rows) if r is not None]
    if found:
        at, source = zip(*found, strict=True)
        order = np.argsort(source)  # sorted reads of the memory map
        matrix[np.array(at)[order]] = vectors[np.array(source)[order]]
    return torch.from_numpy(matrix), len(found)


def embedding_matrix(spec: str, itos: Sequence[str], dim: int, seed: int = 0) -> torch.Tensor:
    """`spec` is a GloVe path or 'random' (N(0, 1), seeded)."""
    if spec == "random":
        return torch.randn(len(itos), dim, generator=torch.Generator().manual_seed(seed))
    matrix, found = glove_matrix(spec, itos)
    if matrix.shape[1] != dim:
        raise InputError(f"{spec}: vectors are {matrix.shape[1]}-d but --d_model_caps is {dim}")
    log.info("word embeddings: %d of %d vocabulary tokens found in %s", found, len(itos), spec)
    return matrix
