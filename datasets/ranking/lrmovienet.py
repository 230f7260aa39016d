"""LRMovieNet for LR²PPO: the clip lists, the feature HDF5, and the samples each stage learns from.

Files:
- clip lists (`first_stage_data.json`, `first_second_stage_data.json`, `val_data.json`, `test_data.json`):
  `[{"id", "tags": [{"tag", "target"}, ...], ...}]`, the tags in the order of the clip's `text_emb` rows;
  `target` is the relevance level (0 low, 1 medium, 2 high), an integer or anything `int()` takes;
- the pair file (`first_second_data_pair_10pct.json`): the same clips plus `"index": [[i, j], ...]`, meaning
  label i is preferred over label j;
- the feature HDF5 (`clean_feat.h5`): one group per clip id holding `text_emb [T, seq_length, D]` (one row per
  label) and `img_emb [1, F, D]` (F frame features).

Frames fill `max_imgs` slots: the first `max_imgs` of the clip's frames, cycled (slot k = frame k mod F) when
it has fewer. Training may shuffle them first as the original does (`frame_order="random"`); evaluation always
uses the stored order (the original shuffled at evaluation too, which made its metric random).
Every sample carries its `frame_key` (−1 = stored order, else the seed of its permutation), so a PPO rollout
buffer that keeps clip ids, label positions and frame keys re-reads exactly the features the actor saw.

Randomness never comes from global state: item i of epoch e draws from its own generator (`stream_seed(Stream.ITEM, seed, e, i)`),
so a sample is the same whatever the number of DataLoader workers or ranks. Call `set_epoch(e)` before each
epoch's DataLoader iterator is created (and do not use persistent workers, which keep the old epoch).
The HDF5 file is opened lazily in each process: h5py handles must not cross a fork into DataLoader workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from utilities.errors import InputError
from utilities.files import read_json
from utilities.seeding import Stream, stream_seed

FRAME_ORDERS = ("random", "stored")
STORED_ORDER = -1  # the frame_key of the stored frame order
REWARD_VAL_LEVELS = (0, 1, 2)  # a reward-validation triplet takes one label of each level
REWARD_VAL_TRIPLETS_PER_CLIP = 100


# --- clip lists -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    id: str  # the clip's group in the feature HDF5
    tags: tuple[str, ...]  # label strings, in the order of the clip's text_emb rows
    targets: tuple[int, ...]  # relevance level of each label
    pairs: tuple[
        tuple[int, int], ...
    ] = ()  # (preferred, other) label positions, from the pair file's `index`


@dataclass(frozen=True)
class ClipList:
    path: Path
    clips: tuple[Clip, ...]

    def __len__(self) -> int:
        return len(self.clips)

    def by_id(self) -> dict[str, Clip]:
        return {clip.id: clip for clip in self.clips}


def read_clip_list(path: str | Path, with_pairs: bool = False) -> ClipList:
    """Read and validate a clip list (`with_pairs`: the pair file, every clip has `index`). Errors name the file
    and the clip: an empty candidate list, a bad target, a pair index out of range, a repeated clip id."""
    path = Path(path)
    entries = read_json(path)
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{path}: expected a non-empty JSON list of clips")
    clips, seen = [], set()
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry:
            raise InputError(f"{path}: entry {n} is not a clip object with an id")
        clip = _parse_clip(entry, with_pairs, f"{path}: clip {entry['id']} (entry {n})")
        if clip.id in seen:
            raise InputError(f"{path}: clip {clip.id} (entry {n}) is listed twice")
        seen.add(clip.id)
        clips.append(clip)
    if with_pairs and not any(clip.pairs for clip in clips):
        raise InputError(f"{path}: no clip has a preference pair in `index`")
    return ClipList(path, tuple(clips))


def _parse_clip(entry: dict, with_pairs: bool, where: str) -> Clip:
    tags = entry.get("tags")
    if not isinstance(tags, list) or not tags:
        raise InputError(f"{where}: empty or missing candidate list `tags`")
    names, targets = [], []
    for k, tag in enumerate(tags):
        if not isinstance(tag, dict) or "tag" not in tag or "target" not in tag:
            raise InputError(f"{where}: tags[{k}] needs `tag` and `target`")
        names.append(str(tag["tag"]))
        targets.append(_level(tag["target"], f"{where}: tags[{k}] ({tag['tag']})"))
    pairs = ()
    if with_pairs:
        pairs = _pairs(entry.get("index"), len(tags), where)
    return Clip(str(entry["id"]), tuple(names), tuple(targets), pairs)


def _level(value: object, where: str) -> int:
    """A relevance level: an int, an integral float or an integer string (what the original's int() took)."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        level = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{where}: target {value!r} is not an integer relevance level") from None
    if level < 0:
        raise InputError(f"{where}: target {level} is negative")
    return level


def _pairs(index: object, n_tags: int, where: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(index, list):
        raise InputError(f"{where}: the pair file needs `index`, a list of [i, j] label positions")
    pairs = []
    for k, pair in enumerate(index):
        ok = isinstance(pair, list) and len(pair) == 2 and all(type(v) is int for v in pair)
        if not ok:
            raise InputError(f"{where}: index[{k}] = {pair!r} is not a pair [i, j] of label positions")
        i, j = pair
        if not (0 <= i < n_tags and 0 <= j < n_tags):
            raise InputError(f"{where}: index[{k}] = {pair} is out of range for its {n_tags} labels")
        if i == j:
            raise InputError(f"{where}: index[{k}] = {pair} compares a label with itself")
        pairs.append((i, j))
    return tuple(pairs)


# --- the feature HDF5 -----------------------------------------------------------------------------------------


class ClipFeatures:
    """`clean_feat.h5`: per clip id, `text_emb [T, S, D]` and `img_emb [1, F, D]`. `check` validates the clips
    of a list up front (shapes only, cheap); every read also rejects NaN/inf, naming the clip."""

    def __init__(self, path: str | Path, seq_length: int | None = None, dim: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(
                f"{self.path}: feature HDF5 not found (LRMovieNet's clean_feat.h5: README 'Where to get the real things')"
            )
        self.seq_length, self.dim = seq_length, dim  # None: taken from the first clip checked
        self._handle: h5py.File | None = None
        self._pid: int | None = None
        self._datasets: dict[str, tuple[h5py.Dataset, h5py.Dataset]] = {}  # per clip: (text_emb, img_emb)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_pid": None, "_datasets": {}}

    def _file(self) -> h5py.File:
        if self._handle is None or self._pid != os.getpid():
            try:
                self._handle = h5py.File(self.path, "r")
            except OSError as e:
                raise InputError(f"{self.path}: not a readable HDF5 file ({e})") from None
            self._pid = os.getpid()
            self._datasets = {}
        return self._handle

    def _clip(self, clip_id: str) -> tuple[h5py.Dataset, h5py.Dataset]:
        """The clip's (text_emb, img_emb) datasets; h5py's path lookups cost more than a small read, so the
        handles are kept for the life of the file handle."""
        f = self._file()
        if clip_id not in self._datasets:
            group = f[clip_id]
            self._datasets[clip_id] = (group["text_emb"], group["img_emb"])
        return self._datasets[clip_id]

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = self._pid = None
        self._datasets = {}

    def check(self, clip_list: ClipList) -> None:
        """Every clip of the list has a group with consistent shapes and exactly one text row per label. Uses
        its own short-lived handle, so the process that builds the datasets holds none when workers fork."""
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise InputError(f"{self.path}: not a readable HDF5 file ({e})") from None
        with f:
            self._check(f, clip_list)

    def _check(self, f: h5py.File, clip_list: ClipList) -> None:
        for clip in clip_list.clips:
            where = f"{self.path}: clip {clip.id} (from {clip_list.path})"
            group = f.get(clip.id)
            if not isinstance(group, h5py.Group):
                raise InputError(f"{where}: no such group in the feature file")
            if "text_emb" not in group or "img_emb" not in group:
                raise InputError(f"{where}: needs datasets text_emb and img_emb")
            text, img = group["text_emb"].shape, group["img_emb"].shape
            if len(text) != 3 or len(img) != 3 or img[0] != 1 or img[1] < 1:
                raise InputError(
                    f"{where}: text_emb {text} / img_emb {img}, expected [T, S, D] / [1, F ≥ 1, D]"
                )
            if text[2] != img[2]:
                raise InputError(f"{where}: text_emb is {text[2]}-d but img_emb is {img[2]}-d")
            self.seq_length = self.seq_length or text[1]
            self.dim = self.dim or text[2]
            if (text[1], text[2]) != (self.seq_length, self.dim):
                raise InputError(
                    f"{where}: text_emb rows are [{text[1]}, {text[2]}], expected "
                    f"[seq_length {self.seq_length}, dim {self.dim}]"
                )
            if text[0] != len(clip.tags):  # one row per label: extra rows would be cut silently
                raise InputError(
                    f"{where}: {len(clip.tags)} labels in the clip list but {text[0]} rows in text_emb"
                )

    def text(self, clip_id: str, labels: np.ndarray) -> np.ndarray:
        """Text features of the given label positions (repeats allowed), [len(labels), S, D] float32."""
        unique, inverse = np.unique(labels, return_inverse=True)
        rows = self._clip(clip_id)[0][unique.tolist()]
        return _finite(rows[inverse], f"{self.path}: clip {clip_id} text_emb")

    def frames(self, clip_id: str) -> np.ndarray:
        """All F frame features of a clip in stored order, [F, D] float32."""
        return _finite(self._clip(clip_id)[1][0], f"{self.path}: clip {clip_id} img_emb")

    def n_frames(self, clip_id: str) -> int:
        return self._clip(clip_id)[1].shape[1]


def _finite(array: np.ndarray, where: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{where}: holds NaN or inf")
    return array


def frame_slots(n_frames: int, max_imgs: int, frame_key: int = STORED_ORDER) -> np.ndarray:
    """Which frame fills each of the `max_imgs` slots: the frames in stored order (frame_key −1) or permuted by
    `default_rng(frame_key)`, the first `max_imgs` of them, cycled (slot k = k-th frame mod F) when F is smaller."""
    if n_frames < 1 or max_imgs < 1:
        raise ValueError(f"need at least one frame and one slot, got {n_frames} frames, {max_imgs} slots")
    order = np.arange(n_frames)
    if frame_key != STORED_ORDER:
        order = np.random.default_rng(frame_key).permutation(n_frames)
    return order[np.arange(max_imgs) % n_frames]


def pointwise_labels(targets: Sequence[int], max_tags: int) -> np.ndarray:
    """The original's pointwise training list: the first `max_tags` labels; a shorter clip is
    extended by cycling through its relevant labels (target ≠ 0; all labels if none is), starting at position
    T mod n of that list (T labels, n candidates)."""
    n_labels = len(targets)
    if n_labels >= max_tags:
        return np.arange(max_tags)
    candidates = [i for i, t in enumerate(targets) if t != 0] or list(range(n_labels))
    start = n_labels % len(candidates)
    extra = [candidates[(start + k) % len(candidates)] for k in range(max_tags - n_labels)]
    return np.array([*range(n_labels), *extra])


# --- samples and batches --------------------------------------------------------------------------------------


@dataclass
class LabelItem:
    """Some labels of one clip with their features; the clip's frames once (the model projects them once per
    clip, not once per label). `chosen`/`rejected` (reward model) are 4-slot sequences of positions in `labels`."""

    clip_id: str
    labels: np.ndarray  # (L,) int64 positions in the clip's tag list
    text: np.ndarray  # (L, S, D) float32
    frames: np.ndarray  # (max_imgs, D) float32
    targets: np.ndarray  # (L,) float32 relevance levels
    frame_key: int  # −1 stored order, else the seed of the frame permutation
    chosen: np.ndarray | None = None  # (4,) int64
    rejected: np.ndarray | None = None
    from_source: bool | None = None  # LETOR alignment: a source-domain query (datasets/ranking/letor.py)


@dataclass
class LabelBatch:
    """A padded batch of `LabelItem`s. `mask` is True at real labels; padded slots hold label 0, zero features,
    target 0. `chosen`/`rejected` are set for reward-model batches only."""

    clip_ids: list[str]
    labels: torch.Tensor  # (B, L) int64
    mask: torch.Tensor  # (B, L) bool
    text: torch.Tensor  # (B, L, S, D) float32
    frames: torch.Tensor  # (B, max_imgs, D) float32
    targets: torch.Tensor  # (B, L) float32
    frame_keys: torch.Tensor  # (B,) int64
    chosen: torch.Tensor | None = None  # (B, 4) int64
    rejected: torch.Tensor | None = None
    from_source: torch.Tensor | None = None  # (B,) bool, LETOR alignment batches
    indices: list[int] | None = None  # the items' dataset indices (set by the stages' loader)
    stand_in: bool = False  # under torchrun: a rank's empty share of a global batch, stepped on with weight 0

    def __len__(self) -> int:
        return len(self.clip_ids)

    def _map_tensors(self, fn) -> LabelBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return LabelBatch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LabelBatch:
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> LabelBatch:
        return self._map_tensors(lambda t: t if t.is_pinned() else t.pin_memory())


def collate_labels(items: Sequence[LabelItem]) -> LabelBatch:
    """DataLoader `collate_fn`: pads the label axis to the longest item, with a mask."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    n_labels = max(len(item.labels) for item in items)
    seq_length, dim = items[0].text.shape[1:]
    labels = torch.zeros(len(items), n_labels, dtype=torch.int64)
    mask = torch.zeros(len(items), n_labels, dtype=torch.bool)
    text = torch.zeros(len(items), n_labels, seq_length, dim)
    targets = torch.zeros(len(items), n_labels)
    for b, item in enumerate(items):
        n = len(item.labels)
        labels[b, :n] = torch.from_numpy(item.labels)
        mask[b, :n] = True
        text[b, :n] = torch.from_numpy(item.text)
        targets[b, :n] = torch.from_numpy(item.targets)
    has_comparisons = items[0].chosen is not None
    return LabelBatch(
        clip_ids=[item.clip_id for item in items],
        labels=labels,
        mask=mask,
        text=text,
        frames=torch.from_numpy(np.stack([item.frames for item in items])),
        targets=targets,
        frame_keys=torch.tensor([item.frame_key for item in items], dtype=torch.int64),
        chosen=torch.from_numpy(np.stack([i.chosen for i in items])) if has_comparisons else None,
        rejected=torch.from_numpy(np.stack([i.rejected for i in items])) if has_comparisons else None,
        from_source=None
        if items[0].from_source is None
        else torch.tensor([i.from_source for i in items], dtype=torch.bool),
    )


class _LRMovieNetDataset(Dataset):
    """What every stage's dataset shares: the clip list, its checked features, frame slots, seeded draws."""

    def __init__(self, clips: ClipList, features: ClipFeatures, max_imgs: int, frame_order: str, seed: int):
        if frame_order not in FRAME_ORDERS:
            raise ValueError(f"frame_order must be one of {FRAME_ORDERS}, got {frame_order!r}")
        features.check(clips)
        self.clips, self.features, self.max_imgs = clips, features, max_imgs
        self.frame_order, self.seed, self.epoch = frame_order, seed, 0
        self._by_id = clips.by_id()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(stream_seed(Stream.ITEM, self.seed, self.epoch, index))

    def _frame_key(self, rng: np.random.Generator) -> int:
        return int(rng.integers(2**62)) if self.frame_order == "random" else STORED_ORDER

    def load(
        self, clip_id: str, labels: Sequence[int] | np.ndarray, frame_key: int = STORED_ORDER
    ) -> LabelItem:
        """The features of labels `labels` of clip `clip_id`, frames as `frame_key` orders them."""
        clip = self._by_id[clip_id]
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim != 1 or labels.size == 0 or labels.min() < 0 or labels.max() >= len(clip.tags):
            raise ValueError(
                f"clip {clip_id}: label positions {labels.tolist()} outside its {len(clip.tags)}"
            )
        frames = self.features.frames(clip_id)
        return LabelItem(
            clip_id=clip_id,
            labels=labels,
            text=self.features.text(clip_id, labels),
            frames=frames[frame_slots(len(frames), self.max_imgs, frame_key)],
            targets=np.asarray(clip.targets, dtype=np.float32)[labels],
            frame_key=frame_key,
        )

    def fetch(
        self,
        clip_ids: Sequence[str],
        labels: Sequence[Sequence[int]],
        frame_keys: Sequence[int] | None = None,
    ) -> LabelBatch:
        """A batch re-read from what a rollout buffer stores: clip ids, label positions, frame keys."""
        keys = [STORED_ORDER] * len(clip_ids) if frame_keys is None else [int(k) for k in frame_keys]
        return collate_labels([self.load(c, ls, k) for c, ls, k in zip(clip_ids, labels, keys, strict=True)])


class ClipDataset(_LRMovieNetDataset):
    """One item per clip. Evaluation (`max_tags=None`): all labels in the clip's order, stored frame order.
    Pointwise training (`max_tags`): the original's fixed-length label list (`pointwise_labels`)."""

    def __init__(
        self,
        clips: ClipList,
        features: ClipFeatures,
        max_imgs: int,
        max_tags: int | None = None,
        frame_order: str = "stored",
        seed: int = 0,
    ):
        super().__init__(clips, features, max_imgs, frame_order, seed)
        self.max_tags = max_tags

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> LabelItem:
        clip = self.clips.clips[index]
        if self.max_tags is None:
            labels = np.arange(len(clip.tags))
        else:
            labels = pointwise_labels(clip.targets, self.max_tags)
        return self.load(clip.id, labels, self._frame_key(self._rng(index)))


class RewardPairDataset(_LRMovieNetDataset):
    """Reward-model training: one item per `index` pair [i, j] (i preferred), labels (i, j).
    The two context slots are shown in random order: chosen (0,1,0,1) / rejected (0,1,1,0), or chosen (1,0,0,1) /
    rejected (1,0,1,0), each with probability ½; the chosen ranking always puts i first."""

    def __init__(
        self,
        clips: ClipList,
        features: ClipFeatures,
        max_imgs: int,
        frame_order: str = "random",
        seed: int = 0,
    ):
        super().__init__(clips, features, max_imgs, frame_order, seed)
        self.items = [(clip.id, pair) for clip in clips.clips for pair in clip.pairs]
        if not self.items:
            raise InputError(f"{clips.path}: no preference pairs (read it with with_pairs=True)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> LabelItem:
        clip_id, pair = self.items[index]
        rng = self._rng(index)
        item = self.load(clip_id, pair, self._frame_key(rng))
        if rng.random() < 0.5:
            item.chosen, item.rejected = np.array([0, 1, 0, 1]), np.array([0, 1, 1, 0])
        else:
            item.chosen, item.rejected = np.array([1, 0, 0, 1]), np.array([1, 0, 1, 0])
        return item


class RewardTripletDataset(_LRMovieNetDataset):
    """Reward-model validation, fixed by `seed`: for every clip with labels of all three levels,
    `per_clip` triplets of one random label per level; two of the three slots a, b drawn at random, chosen
    (a, b, hi, lo) and rejected (a, b, lo, hi), where hi is the slot with the higher level."""

    def __init__(
        self, clips: ClipList, features: ClipFeatures, max_imgs: int, seed: int = 0, per_clip: int = 100
    ):
        super().__init__(clips, features, max_imgs, "stored", seed)
        self.eligible = [c for c in clips.clips if set(REWARD_VAL_LEVELS) <= set(c.targets)]
        if not self.eligible:
            raise InputError(f"{clips.path}: no clip has labels of all levels {REWARD_VAL_LEVELS}")
        self.per_clip = per_clip

    def set_epoch(self, epoch: int) -> None:
        """Validation comparisons do not change between epochs."""

    def __len__(self) -> int:
        return len(self.eligible) * self.per_clip

    def __getitem__(self, index: int) -> LabelItem:
        clip = self.eligible[index // self.per_clip]
        rng = self._rng(index)
        targets = np.asarray(clip.targets)
        labels = [int(rng.choice(np.flatnonzero(targets == level))) for level in REWARD_VAL_LEVELS]
        item = self.load(clip.id, labels)
        a, b = (int(s) for s in rng.choice(3, size=2, replace=False))
        hi, lo = (a, b) if targets[labels[a]] >= targets[labels[b]] else (b, a)
        item.chosen, item.rejected = np.array([a, b, hi, lo]), np.array([a, b, lo, hi])
        return item


class PPOPairDataset(_LRMovieNetDataset):
    """PPO training: each epoch, `pairs_per_clip` random ordered pairs of distinct labels per clip
    (a fresh draw per epoch, `set_epoch`). Targets ride along for logging; PPO learns from the reward model."""

    def __init__(
        self,
        clips: ClipList,
        features: ClipFeatures,
        max_imgs: int,
        pairs_per_clip: int,
        frame_order: str = "random",
        seed: int = 0,
    ):
        super().__init__(clips, features, max_imgs, frame_order, seed)
        for clip in clips.clips:
            if len(clip.tags) < 2:
                raise InputError(f"{clips.path}: clip {clip.id} has {len(clip.tags)} label; PPO pairs need 2")
        self.pairs_per_clip = pairs_per_clip

    def __len__(self) -> int:
        return len(self.clips) * self.pairs_per_clip

    def __getitem__(self, index: int) -> LabelItem:
        clip = self.clips.clips[index // self.pairs_per_clip]
        rng = self._rng(index)
        pair = rng.permutation(len(clip.tags))[:2]
        return self.load(clip.id, pair, self._frame_key(rng))
