"""LETOR query lists in svmlight format (MQ2008, MSLR-WEB10K; spec §3.5): `label qid:Q 1:v 2:v ... #comment`.

A query's documents must be on consecutive lines (as LETOR ships them): a qid that comes back after another
query is an error, since it usually means two files with colliding qids were concatenated (the original had
to offset MQ2008's qids for this reason). Features absent from a row are 0, as svmlight defines. Every query
keeps all its documents (the original resampled each to exactly 20, spec §8.17).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utilities.errors import InputError
from utilities.files import not_utf8


@dataclass(frozen=True)
class Query:
    qid: str
    labels: np.ndarray  # (n,) int64 relevance levels
    features: np.ndarray  # (n, n_features) float32
    comments: tuple[
        str, ...
    ]  # the text after '#' on each row (e.g. "docid = ... inc = ... prob = ..."), stripped


def read_letor(path: str | Path, n_features: int | None = None) -> list[Query]:
    """Queries in file order. `n_features` fixes the width (a larger feature index is an error); by default it
    is the largest index in the file. Errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    rows: list[tuple[str, int, dict[int, float], str]] = []
    for number, line in enumerate(lines, start=1):
        body, _, comment = line.partition("#")
        if body.strip():
            rows.append((*_parse_row(body.split(), f"{path}:{number}"), comment.strip()))
    if not rows:
        raise InputError(f"{path}: no rows")
    width = max(max(values, default=0) for _, _, values, _ in rows)
    if n_features is not None:
        if width > n_features:
            raise InputError(f"{path}: feature index {width} beyond the expected {n_features} features")
        width = n_features
    groups: dict[str, list[int]] = {}
    previous = None
    for i, (qid, _, _, _) in enumerate(rows):
        if qid != previous and qid in groups:
            raise InputError(f"{path}: qid {qid} appears again after other queries (row {i + 1})")
        groups.setdefault(qid, []).append(i)
        previous = qid
    queries = []
    for qid, members in groups.items():
        features = np.zeros((len(members), width), dtype=np.float32)
        for r, i in enumerate(members):
            for index, value in rows[i][2].items():
                features[r, index - 1] = value
        labels = np.array([rows[i][1] for i in members], dtype=np.int64)
        queries.append(Query(qid, labels, features, tuple(rows[i][3] for i in members)))
    return queries


def _parse_row(tokens: list[str], where: str) -> tuple[str, int, dict[int, float]]:
    try:
        label = int(tokens[0])
    except ValueError:
        raise InputError(f"{where}: label {tokens[0]!r} is not an integer") from None
    if label < 0:
        raise InputError(f"{where}: label {label} is negative")
    if len(tokens) < 2 or not tokens[1].startswith("qid:") or not tokens[1][4:]:
        raise InputError(f"{where}: expected 'qid:Q' after the label")
    values: dict[int, float] = {}
    last = 0
    for token in tokens[2:]:
        index_text, sep, value_text = token.partition(":")
        try:
            index, value = int(index_text), float(value_text)
        except ValueError:
            index, value = -1, math.nan
        if not sep or index <= last or not math.isfinite(value):
            raise InputError(f"{where}: bad feature {token!r} (want increasing index:finite value)")
        values[index] = value
        last = index
    return tokens[1][4:], label, values
