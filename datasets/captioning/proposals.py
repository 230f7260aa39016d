"""Whole videos for the proposal generator: every feature row of a video, padded at the end.

The original pads rgb and audio with its pad index 1 and flow with 0, so a padded row of V = rgb + flow and of
the audio holds 1.0 in every dimension (`PAD_VALUE`); it pads to exactly 300 video / 800 audio rows
(`PAD_ROWS`) and rejects longer videos. Here a longer video is padded to its own length (`padded_rows`), so a
video within the original's limits gets exactly the original's input. The padded rows enter the encoder and the
heads (they shape the output), but the masks (True = a real row) come from the lengths, not from the value.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.captioning.activitynet import Segment
from datasets.features import FeatureStore
from utilities.errors import InputError

log = logging.getLogger(__name__)

PAD_ROWS = {"audio": 800, "video": 300}  # the original's `pad_feats_up_to`
PAD_VALUE = 1.0


def padded_rows(n_rows: int, modality: str) -> int:
    """Rows a whole video is padded to: the original's 300/800, or its own length when longer."""
    return max(PAD_ROWS[modality], n_rows)


def check_rows(rows: np.ndarray, modality: str, video_id: str) -> np.ndarray:
    if len(rows) == 0:
        raise InputError(f"{video_id}: its {modality} features have no rows (shorter than one feature row)")
    return rows


@dataclass
class Video:
    """One video of an annotation file: its duration and ground-truth (start, end) segments in seconds."""

    video_id: str
    duration: float
    segments: list[tuple[float, float]]


def videos_of(segments: Sequence[Segment]) -> list[Video]:
    """CSV rows grouped by video, in file order."""
    videos: dict[str, Video] = {}
    for s in segments:
        videos.setdefault(s.video_id, Video(s.video_id, s.duration, [])).segments.append((s.start, s.end))
    return list(videos.values())


@dataclass
class VideoBatch:
    """Padded whole videos. `features[m]` (B, S, d) with `PAD_VALUE` rows after each video's own; `masks[m]`
    (B, 1, S) True = real row; `n_cells[m]` (B,) the rows each video is decoded over (`padded_rows`)."""

    video_ids: list[str]
    durations: list[float]
    segments: list[list[tuple[float, float]]]
    features: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    n_cells: dict[str, torch.Tensor]

    def to(self, device: torch.device | str) -> VideoBatch:
        move = lambda d: {m: t.to(device) for m, t in d.items()}  # noqa: E731
        return VideoBatch(
            self.video_ids,
            self.durations,
            self.segments,
            move(self.features),
            move(self.masks),
            move(self.n_cells),
        )


def batch_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, int]:
    """Per modality, the rows a batch of these videos is padded to: the longest `padded_rows`."""
    return {m: max(padded_rows(len(r[m]), m) for r in rows) for m in ("video", "audio")}


def collate_videos(
    videos: Sequence[Video], rows: Sequence[dict[str, np.ndarray]], pad_to: dict[str, int] | None = None
) -> VideoBatch:
    """Pad each modality to the longest `padded_rows` of the batch (300/800 unless a video is longer), or to
    `pad_to` (under torchrun: a rank's share padded as its whole global batch is, `batch_rows`)."""
    features, masks, n_cells = {}, {}, {}
    for m in ("video", "audio"):
        lengths = [len(r[m]) for r in rows]
        S = max(padded_rows(n, m) for n in lengths) if pad_to is None else pad_to[m]
        out = np.full((len(rows), S, rows[0][m].shape[1]), PAD_VALUE, np.float32)
        for b, r in enumerate(rows):
            out[b, : lengths[b]] = r[m]
        features[m] = torch.from_numpy(out)
        masks[m] = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None])[:, None, :]
        n_cells[m] = torch.tensor([padded_rows(n, m) for n in lengths])
    return VideoBatch(
        [v.video_id for v in videos],
        [v.duration for v in videos],
        [list(v.segments) for v in videos],
        features,
        masks,
        n_cells,
    )


class VideoDataset(Dataset):
    """Whole videos with their features (video = rgb + flow, audio); `collate` pads them (`collate_videos`)."""

    def __init__(self, videos: Sequence[Video], stores: dict[str, FeatureStore]):
        self.videos = list(videos)
        self.stores = stores

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> tuple[Video, dict[str, np.ndarray]]:
        v = self.videos[i]
        return v, {m: check_rows(store.rows(v.video_id), m, v.video_id) for m, store in self.stores.items()}

    def collate(
        self, items: Sequence[tuple[Video, dict[str, np.ndarray]]], pad_to: dict[str, int] | None = None
    ) -> VideoBatch:
        return collate_videos([v for v, _ in items], [r for _, r in items], pad_to)
