"""ActivityNet Captions: the annotation files, the caption dataset and its batches.

Files: tab-separated CSVs `video_id, caption, start, end, duration, phase, idx` (one row per
ground-truth segment) and the official reference JSONs `{video_id: {duration, timestamps, sentences}}`.
Every row is validated; the known anomalies of the real train.csv (start ≥ end, end > duration) are kept,
counted in one warning, and cropped deliberately (`datasets.features.crop_indices`).

A batch (`CaptionBatch`) carries explicit lengths and boolean masks (True = a real row/token), never a sentinel
pad value, and the timestamps exactly as written in the CSV (Python floats parsed from the text).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.features import FeatureStore, crop_indices, open_feature_store
from datasets.vocabulary import Vocabulary, tokenize
from utilities.errors import InputError
from utilities.files import not_utf8

log = logging.getLogger(__name__)

CSV_COLUMNS = ("video_id", "caption", "start", "end", "duration", "phase", "idx")
MISSING_IDS_SHOWN = 5


@dataclass(frozen=True)
class Segment:
    """One CSV row: a ground-truth segment and its caption."""

    video_id: str
    caption: str
    start: float
    end: float
    duration: float
    phase: str
    idx: int


@dataclass
class Anomalies:
    """Rows kept but cropped deliberately: start ≥ end (one feature row) and end > duration (clamped)."""

    start_ge_end: int = 0
    end_gt_duration: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"start_ge_end": self.start_ge_end, "end_gt_duration": self.end_gt_duration}


@dataclass
class Annotations:
    path: Path
    segments: list[Segment]
    anomalies: Anomalies = field(default_factory=Anomalies)

    @property
    def video_ids(self) -> list[str]:
        """Distinct video ids in file order."""
        return list(dict.fromkeys(s.video_id for s in self.segments))


def read_captions_csv(path: str | Path) -> Annotations:
    """Read and validate a caption CSV; errors name the file, the line and the reason."""
    path = Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8")
    except FileNotFoundError:
        raise InputError(
            f"{path}: caption CSV not found (run ./download_data.sh, see README 'Where to get the real things')"
        ) from None
    segments: list[Segment] = []
    anomalies = Anomalies()
    examples: list[str] = []
    with handle:
        reader = csv.reader(handle, delimiter="\t", quotechar='"')
        try:
            header = next(reader, None)
            if header is None or tuple(header) != CSV_COLUMNS:
                raise InputError(
                    f"{path}: line 1: expected the tab-separated header {list(CSV_COLUMNS)}, got "
                    f"{_shortened(str(header))} (wrong column order, names or separator)"
                )
            for row in reader:
                segment = _parse_row(row, path, reader.line_num, len(segments))
                if segment.start >= segment.end or segment.end > segment.duration:
                    anomalies.start_ge_end += segment.start >= segment.end
                    anomalies.end_gt_duration += segment.end > segment.duration
                    if len(examples) < 3:
                        examples.append(
                            f"line {reader.line_num} {segment.video_id} {segment.start}–{segment.end}"
                        )
                segments.append(segment)
        except csv.Error as e:
            raise InputError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
        except UnicodeDecodeError:
            raise not_utf8(path) from None
    if not segments:
        raise InputError(f"{path}: no rows after the header")
    if anomalies.start_ge_end or anomalies.end_gt_duration:
        log.warning(
            "%s: %d rows with start >= end and %d with end > duration: kept, cropped to the video with at least "
            "one feature row (e.g. %s)",
            path,
            anomalies.start_ge_end,
            anomalies.end_gt_duration,
            "; ".join(examples),
        )
    return Annotations(path, segments, anomalies)


def _shortened(text: str, limit: int = 120) -> str:
    """A quote of the file that keeps a one-line error short (a JSON file's first line can be megabytes)."""
    return text if len(text) <= limit else f"{text[:limit]} ..."


def _parse_row(row: list[str], path: Path, line: int, expected_idx: int) -> Segment:
    where = f"{path}: line {line}"
    if len(row) != len(CSV_COLUMNS):
        raise InputError(f"{where}: expected {len(CSV_COLUMNS)} tab-separated fields, got {len(row)}")
    video_id, caption, start, end, duration, phase, idx = row
    if not video_id or not caption.strip():
        raise InputError(f"{where}: empty video_id or caption")
    times = {}
    for name, text in (("start", start), ("end", end), ("duration", duration)):
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"{where} ({video_id}): {name} {text!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise InputError(f"{where} ({video_id}): {name} {text!r} must be a finite non-negative number")
        times[name] = value
    if times["duration"] == 0:
        raise InputError(f"{where} ({video_id}): duration is 0")
    if not idx.isdigit() or int(idx) != expected_idx:
        raise InputError(
            f"{where} ({video_id}): idx {idx!r} must equal the 0-based row number {expected_idx}"
        )
    return Segment(video_id, caption, times["start"], times["end"], times["duration"], phase, int(idx))


# --- features -----------------------------------------------------------------------------------------------


def open_stores(cfg) -> dict[str, FeatureStore]:
    """The feature stores `--modality` needs, keyed 'video' / 'audio'."""
    stores = {}
    if "video" in cfg.modality:
        stores["video"] = open_feature_store(cfg.video_features_path, "video", cfg.d_vid)
    if "audio" in cfg.modality:
        stores["audio"] = open_feature_store(cfg.audio_features_path, "audio", cfg.d_aud)
    return stores


def missing_videos(video_ids: Sequence[str], stores: dict[str, FeatureStore]) -> dict[str, list[str]]:
    """Per modality, the ids (in file order) without features."""
    missing = {}
    for modality, store in stores.items():
        available = store.video_ids()
        absent = [v for v in dict.fromkeys(video_ids) if v not in available]
        if absent:
            missing[modality] = absent
    return missing


def drop_missing(annotations: Annotations, stores: dict[str, FeatureStore], skip: bool) -> list[Segment]:
    """The segments whose videos have every feature; a clear error (or, with `skip`, a counted warning)."""
    missing = missing_videos(annotations.video_ids, stores)
    if not missing:
        return annotations.segments
    absent = set().union(*missing.values())
    if not skip:
        details = "; ".join(
            f"{len(ids)} without {m} features in {stores[m].path} (first: {', '.join(ids[:MISSING_IDS_SHOWN])})"
            for m, ids in missing.items()
        )
        raise InputError(
            f"{annotations.path}: {len(absent)} of {len(annotations.video_ids)} videos lack features: {details}. "
            "Pass --skip_missing_features to drop their segments."
        )
    kept = [s for s in annotations.segments if s.video_id not in absent]
    log.warning(
        "%s: dropped %d of %d segments (%d videos) whose features are missing (--skip_missing_features)",
        annotations.path,
        len(annotations.segments) - len(kept),
        len(annotations.segments),
        len(absent),
    )
    if not kept:
        raise InputError(f"{annotations.path}: no segment has features left")
    return kept


# --- dataset and batches ------------------------------------------------------------------------------------


@dataclass
class CaptionItem:
    features: dict[str, np.ndarray]
    caption_ids: np.ndarray
    segment: Segment


@dataclass
class CaptionBatch:
    """A padded batch. Masks are True at real rows/tokens; `captions` is `<s> w… </s>` padded with pad_idx.

    Decoder input = captions[:, :-1], target = captions[:, 1:] (with caption_mask[:, 1:] marking real targets).
    `video`/`audio` are None when `--modality` leaves them out.
    """

    video: torch.Tensor | None  # (B, Tv, d_vid) float32, rgb + flow
    video_mask: torch.Tensor | None  # (B, Tv) bool
    audio: torch.Tensor | None  # (B, Ta, d_aud) float32
    audio_mask: torch.Tensor | None  # (B, Ta) bool
    captions: torch.Tensor  # (B, L) int64
    caption_mask: torch.Tensor  # (B, L) bool
    caption_lengths: torch.Tensor  # (B,) int64, with <s> and </s>
    video_ids: list[str]
    starts: list[float]  # exactly as in the CSV
    ends: list[float]
    durations: list[float]
    raw_captions: list[str]
    indices: list[int]  # the CSV idx of each row
    stand_in: bool = False  # under torchrun: a stand-in for an empty share, stepped on with zero weight

    def __len__(self) -> int:
        return len(self.video_ids)

    def _map_tensors(self, fn) -> CaptionBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return CaptionBatch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CaptionBatch:
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> CaptionBatch:
        """Page-locked copies for fast GPU transfers (tensors already pinned are kept)."""
        return self._map_tensors(lambda t: t if t.is_pinned() else t.pin_memory())


def pad_into(arrays: Sequence[np.ndarray], out: np.ndarray) -> None:
    """Copy (T_i, D) arrays into the rows of `out` (B, T, D), zeroing the rest (`out` may be a reused buffer).

    Copying through NumPy also takes the read-only rows of a memory map."""
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
        out[i, len(a) :] = 0


@dataclass
class CollatedItems:
    """A batch without its features: the small parts, which pickle cheaply out of a DataLoader worker. The
    features travel separately: padded in place, or in a shared-memory slot (`slot`, see `datasets.loader`)."""

    feature_lengths: dict[str, np.ndarray]
    caption_ids: list[np.ndarray]
    segments: list[Segment]
    slot: int | None = None


def assemble(features: dict[str, torch.Tensor], collated: CollatedItems, pad_idx: int) -> CaptionBatch:
    """The `CaptionBatch` of padded `features` and the rest of `collated`: masks, padded captions, metadata."""
    masks = {
        m: torch.arange(features[m].shape[1])[None, :] < torch.from_numpy(lengths)[:, None]
        for m, lengths in collated.feature_lengths.items()
    }
    caption_lengths = torch.tensor([len(ids) for ids in collated.caption_ids])
    captions = torch.full((len(caption_lengths), int(caption_lengths.max())), pad_idx, dtype=torch.int64)
    for i, ids in enumerate(collated.caption_ids):
        captions[i, : len(ids)] = torch.from_numpy(ids)
    segments = collated.segments
    return CaptionBatch(
        video=features.get("video"),
        video_mask=masks.get("video"),
        audio=features.get("audio"),
        audio_mask=masks.get("audio"),
        captions=captions,
        caption_mask=torch.arange(captions.shape[1])[None, :] < caption_lengths[:, None],
        caption_lengths=caption_lengths,
        video_ids=[s.video_id for s in segments],
        starts=[s.start for s in segments],
        ends=[s.end for s in segments],
        durations=[s.duration for s in segments],
        raw_captions=[s.caption for s in segments],
        indices=[s.idx for s in segments],
    )


class CaptionDataset(Dataset):
    """Segments of one split with their feature crops and caption ids.

    Captions are tokenised once here; features are read per item (so the dataset forks cheaply into
    DataLoader workers; HDF5 handles are opened lazily in each worker).
    """

    def __init__(self, segments: Sequence[Segment], vocab: Vocabulary, stores: dict[str, FeatureStore]):
        self.segments = list(segments)
        self.vocab = vocab
        self.stores = stores
        tokens = tokenize([s.caption for s in self.segments])
        self.caption_ids = [np.array(vocab.encode(t), dtype=np.int64) for t in tokens]

    def __len__(self) -> int:
        return len(self.segments)

    def __getitem__(self, i: int) -> CaptionItem:
        s = self.segments[i]
        features = {m: store.crop(s.video_id, s.start, s.end, s.duration) for m, store in self.stores.items()}
        return CaptionItem(features, self.caption_ids[i], s)

    def max_crop_rows(self) -> dict[str, int]:
        """The longest feature crop of any segment, per modality (what a batch buffer must hold)."""
        longest = {}
        for m, store in self.stores.items():
            n_rows = {vid: store.n_rows(vid) for vid in {s.video_id for s in self.segments}}
            spans = (crop_indices(n_rows[s.video_id], s.start, s.end, s.duration) for s in self.segments)
            longest[m] = max((i1 - i0 for i0, i1 in spans), default=1)
        return longest

    def collate_items(self, items: Sequence[CaptionItem]) -> CollatedItems:
        return CollatedItems(
            feature_lengths={m: np.array([len(it.features[m]) for it in items]) for m in self.stores},
            caption_ids=[it.caption_ids for it in items],
            segments=[it.segment for it in items],
        )

    def collate(self, items: Sequence[CaptionItem]) -> CaptionBatch:
        """Pad a list of items into a `CaptionBatch` (the collate function without DataLoader workers)."""
        collated = self.collate_items(items)
        features = {}
        for m, lengths in collated.feature_lengths.items():
            features[m] = torch.empty(len(items), int(lengths.max()), self.stores[m].dim, dtype=torch.float32)
            pad_into([it.features[m] for it in items], features[m].numpy())
        return assemble(features, collated, self.vocab.pad_idx)


def build_caption_dataset(
    cfg, meta_path: str | Path, vocab: Vocabulary, stores: dict[str, FeatureStore] | None = None
) -> CaptionDataset:
    """Read `meta_path`, check the features of its videos (`--skip_missing_features`), build the dataset."""
    annotations = read_captions_csv(meta_path)
    stores = open_stores(cfg) if stores is None else stores
    return CaptionDataset(drop_missing(annotations, stores, cfg.skip_missing_features), vocab, stores)
