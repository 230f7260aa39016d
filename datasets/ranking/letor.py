"""LETOR query lists in svmlight format (MQ2008, MSLR-WEB10K): `label qid:Q 1:v 2:v ... #comment`.

A query's documents must be on consecutive lines (as LETOR ships them): a qid that comes back after another
query is an error, since it usually means two files with colliding qids were concatenated (the original had
to offset MQ2008's qids for this reason). Features absent from a row are 0, as svmlight defines. Every query
keeps all its documents (the original resampled each to exactly 20).

The official layout is read as shipped: `<dataset>/Fold1/{train,vali,test}.txt` (`fold_files`). A split is
parsed once into a packed HDF5 (`load_split`: rows, labels, query offsets), written atomically and reused
while the text file keeps its size and modification time, so a second run does not re-parse WEB10K's 1 GB.

The stages see queries as LRMovieNet's clips (a query = a clip, a document = a label; `datasets.ranking.
lrmovienet.LabelItem`/`LabelBatch`), so they run on the same loops: a document is one vector `[1, W]`, a
batch pads its lists to the longest and masks the rest. Items are keyed `"<domain>:<qid>"` (`source`/`target`):
the two datasets' qids cannot collide, with no offset. Randomness per item comes from its own generator
(`stream_seed(Stream.ITEM, seed, epoch, index)`), whatever the number of workers or ranks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np
from torch.utils.data import Dataset

from datasets.ranking.lrmovienet import STORED_ORDER, Clip, ClipList, LabelBatch, LabelItem, collate_labels
from utilities.errors import InputError
from utilities.files import atomic_path, not_utf8
from utilities.seeding import Stream, stream_seed

SPLITS = ("train", "vali", "test")
DOMAINS = ("source", "target")
CACHE_VERSION = 1


@dataclass(frozen=True)
class Query:
    qid: str
    labels: np.ndarray  # (n,) int64 relevance levels
    features: np.ndarray  # (n, n_features) float32
    comments: tuple[
        str, ...
    ]  # the text after '#' on each row (e.g. "docid = ... inc = ... prob = ..."), stripped


def read_letor(
    path: str | Path, n_features: int | None = None, limit_rows: int | None = None, exact_width: bool = False
) -> list[Query]:
    """Queries in file order. `n_features` declares the width (a larger feature index is an error naming the
    line; with `exact_width` a file whose widest row is narrower is one too); by default the width is the
    largest index in the file. `limit_rows`: only the first N rows (the original's `--limit_rows`)."""
    path = Path(path)
    queries: list[Query] = []
    seen: set[str] = set()
    current: tuple[str, list[int], list[dict[int, float]], list[str]] | None = None
    widest, widest_line, rows = 0, 0, 0
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if limit_rows is not None and rows >= limit_rows:
                    break
                body, _, comment = line.partition("#")
                if not body.strip():
                    continue
                where = f"{path}:{number}"
                qid, label, values = _parse_row(body.split(), where)
                top = max(values, default=0)
                if n_features is not None and top > n_features:
                    raise InputError(
                        f"{where}: feature index {top} beyond the declared width of {n_features}"
                    )
                if top > widest:
                    widest, widest_line = top, number
                if current is None or qid != current[0]:
                    if qid in seen:
                        raise InputError(f"{where}: qid {qid} appears again after other queries")
                    if current is not None:
                        queries.append(_query(*current))
                    seen.add(qid)
                    current = (qid, [], [], [])
                current[1].append(label)
                current[2].append(values)
                current[3].append(comment.strip())
                rows += 1
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    if current is None:
        raise InputError(f"{path}: no rows")
    queries.append(_query(*current))
    if exact_width and n_features is not None and widest < n_features:
        raise InputError(
            f"{path}:{widest_line}: the widest row has {widest} features but {n_features} are expected"
        )
    width = widest if n_features is None else n_features
    return [replace(q, features=_widen(q.features, width)) for q in queries]


def _query(qid: str, labels: list[int], values: list[dict[int, float]], comments: list[str]) -> Query:
    width = max((max(v, default=0) for v in values), default=0)
    features = np.zeros((len(values), width), dtype=np.float32)
    for r, row in enumerate(values):
        if row:
            features[r, np.fromiter(row.keys(), np.int64) - 1] = np.fromiter(row.values(), np.float32)
    return Query(qid, np.array(labels, dtype=np.int64), features, tuple(comments))


def _widen(features: np.ndarray, width: int) -> np.ndarray:
    if features.shape[1] == width:
        return features
    return np.pad(features, ((0, 0), (0, width - features.shape[1])))


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


# --- the fold layout and the packed cache -----------------------------------------------------------------------


def fold_files(directory: str | Path, fold: str) -> dict[str, Path]:
    """`<directory>/<fold>/{train,vali,test}.txt` (LETOR's official layout); each must exist."""
    folder = Path(directory) / fold
    files = {split: folder / f"{split}.txt" for split in SPLITS}
    for path in files.values():
        if not path.is_file():
            raise InputError(
                f"{path}: not found (a LETOR fold folder holds train.txt, vali.txt and test.txt; MSLR-WEB10K and "
                "MQ2008: README 'Where to get the real things')"
            )
    return files


@dataclass(frozen=True)
class PackedSplit:
    """One split's rows: query q holds rows `offsets[q]:offsets[q+1]` of `features` and `labels`."""

    path: Path  # the svmlight file it was read from
    qids: tuple[str, ...]
    offsets: np.ndarray  # (Q + 1,) int64
    features: np.ndarray  # (N, W) float32: raw rows, or their projection (`with_features`)
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.qids)

    def rows(self, q: int) -> slice:
        return slice(int(self.offsets[q]), int(self.offsets[q + 1]))

    def with_features(self, features: np.ndarray) -> PackedSplit:
        return replace(self, features=features)

    def summary(self) -> dict[str, object]:
        """Queries, documents, the label histogram and the feature width (`data_summary`)."""
        levels, counts = np.unique(self.labels, return_counts=True)
        return {
            "queries": len(self.qids),
            "documents": len(self.labels),
            "labels": {str(int(level)): int(n) for level, n in zip(levels, counts, strict=True)},
            "features": int(self.features.shape[1]),
        }


def pack(queries: Sequence[Query], path: Path) -> PackedSplit:
    sizes = [len(q.labels) for q in queries]
    return PackedSplit(
        path,
        tuple(q.qid for q in queries),
        np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        np.concatenate([q.features for q in queries]),
        np.concatenate([q.labels for q in queries]),
    )


def load_split(
    path: str | Path, n_features: int, cache_dir: str | Path, limit_rows: int | None = None
) -> PackedSplit:
    """The split at `path`, `n_features` wide: from its packed HDF5 in `cache_dir` when that was made from the
    same file (size and modification time), the same width and the same `limit_rows`; otherwise parsed
    (`read_letor`, exactly `n_features` wide) and packed atomically for the next run."""
    path = Path(path)
    stat = path.stat()
    key = {
        "source": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "n_features": n_features,
        "limit_rows": limit_rows or 0,
        "version": CACHE_VERSION,
    }
    digest = hashlib.sha1(f"{key['source']}|{key['limit_rows']}".encode()).hexdigest()[:12]
    cache = Path(cache_dir) / f"{path.parent.name}_{path.stem}_{digest}.h5"
    if cache.is_file():
        with h5py.File(cache, "r") as f:
            if {k: f.attrs.get(k) for k in key} == key:
                return PackedSplit(
                    path,
                    tuple(q.decode() for q in f["qids"][()]),
                    f["offsets"][()],
                    f["features"][()],
                    f["labels"][()],
                )
    split = pack(read_letor(path, n_features, limit_rows, exact_width=True), path)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update(key)
        f["qids"] = np.array([q.encode() for q in split.qids], dtype=object).astype("S")
        for name in ("offsets", "features", "labels"):
            f[name] = getattr(split, name)
    return split


# --- the datasets of the stages -----------------------------------------------------------------------------------


class QueryLists(Dataset):
    """The queries of one or more splits, each tagged with its domain, as LRMovieNet-like clips (`clips`: ids
    `"<domain>:<qid>"`, documents as labels, relevance levels as targets). A document is a vector `[1, W]`, W the
    widest split's width (narrower rows are zero-padded; the alignment model reads each domain's own columns)."""

    def __init__(self, splits: Sequence[tuple[str, PackedSplit]], seed: int = 0):
        self.splits = list(splits)
        self.width = max(split.features.shape[1] for _, split in self.splits)
        self.where: dict[str, tuple[int, int]] = {}  # clip id → (split, query)
        clips = []
        for s, (domain, split) in enumerate(self.splits):
            if domain not in DOMAINS:
                raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
            for q, qid in enumerate(split.qids):
                key = f"{domain}:{qid}"
                if key in self.where:
                    raise InputError(
                        f"{split.path}: qid {qid} is also in {self.splits[self.where[key][0]][1].path}"
                    )
                self.where[key] = (s, q)
                labels = split.labels[split.rows(q)]
                clips.append(Clip(key, tuple(f"doc {j}" for j in range(len(labels))), tuple(labels.tolist())))
        self.clips = ClipList(self.splits[0][1].path, tuple(clips))
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> LabelItem:
        clip = self.clips.clips[index]
        return self.load(clip.id, np.arange(len(clip.targets)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(stream_seed(Stream.ITEM, self.seed, self.epoch, index))

    def load(
        self, clip_id: str, documents: Sequence[int] | np.ndarray, frame_key: int = STORED_ORDER
    ) -> LabelItem:
        """Documents `documents` (positions in the query) of query `clip_id`."""
        s, q = self.where[clip_id]
        domain, split = self.splits[s]
        rows = split.rows(q)
        documents = np.asarray(documents, dtype=np.int64)
        vectors = np.zeros((len(documents), 1, self.width), dtype=np.float32)
        vectors[:, 0, : split.features.shape[1]] = split.features[rows][documents]
        return LabelItem(
            clip_id=clip_id,
            labels=documents,
            text=vectors,
            frames=np.zeros((0, self.width), dtype=np.float32),
            targets=split.labels[rows][documents].astype(np.float32),
            frame_key=STORED_ORDER,
            from_source=domain == "source",
        )

    def fetch(
        self,
        clip_ids: Sequence[str],
        labels: Sequence[Sequence[int]],
        frame_keys: Sequence[int] | None = None,
    ) -> LabelBatch:
        """A batch re-read from what a PPO rollout buffer stores (query ids and document positions)."""
        return collate_labels([self.load(c, d) for c, d in zip(clip_ids, labels, strict=True)])


class QueryPairs(QueryLists):
    """PPO training: each epoch, `pairs_per_query` random ordered pairs of distinct documents per
    query with at least two; labels ride along for logging only."""

    def __init__(self, splits: Sequence[tuple[str, PackedSplit]], pairs_per_query: int, seed: int = 0):
        super().__init__(splits, seed)
        self.eligible = [c for c in self.clips.clips if len(c.targets) >= 2]
        if not self.eligible:
            raise InputError(f"{self.clips.path}: no query has two documents to pair")
        self.pairs_per_query = pairs_per_query

    def __len__(self) -> int:
        return len(self.eligible) * self.pairs_per_query

    def __getitem__(self, index: int) -> LabelItem:
        clip = self.eligible[index // self.pairs_per_query]
        return self.load(clip.id, self._rng(index).permutation(len(clip.targets))[:2])


class QueryComparisons(QueryLists):
    """Reward-model comparisons, `per_query` per query with at least two label levels: one random
    document of each level present, two of them (p0, p1) at random; chosen ranks the higher-labelled first,
    `[p0, p1, hi, lo]`, rejected `[p0, p1, lo, hi]`. `fixed`: the same draws every epoch (validation)."""

    def __init__(
        self, splits: Sequence[tuple[str, PackedSplit]], per_query: int, seed: int = 0, fixed: bool = False
    ):
        super().__init__(splits, seed)
        self.eligible = [c for c in self.clips.clips if len(set(c.targets)) >= 2]
        if not self.eligible:
            raise InputError(f"{self.clips.path}: no query has documents of two different labels")
        self.per_query, self.fixed = per_query, fixed

    def set_epoch(self, epoch: int) -> None:
        if not self.fixed:
            self.epoch = epoch

    def __len__(self) -> int:
        return len(self.eligible) * self.per_query

    def __getitem__(self, index: int) -> LabelItem:
        clip = self.eligible[index // self.per_query]
        rng = self._rng(index)
        targets = np.asarray(clip.targets)
        drawn = [int(rng.choice(np.flatnonzero(targets == level))) for level in np.unique(targets)]
        p0, p1 = (drawn[i] for i in rng.choice(len(drawn), size=2, replace=False))
        item = self.load(clip.id, [p0, p1])
        hi, lo = (0, 1) if targets[p0] > targets[p1] else (1, 0)
        item.chosen, item.rejected = np.array([0, 1, hi, lo]), np.array([0, 1, lo, hi])
        return item
