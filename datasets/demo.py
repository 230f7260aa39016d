"""A small synthetic ActivityNet Captions look-alike, generated on demand in the real on-disk formats.

Because it is written as the real CSVs, JSONs and `.npy` feature directories, the demo runs exactly the code
real data runs. It is learnable: each caption comes from a small grammar ("A man plays a guitar in a park"),
and over each event's time span the video features carry the event's action and object (rgb: object + the
video's place, flow: action) while the audio features carry its subject and the action's sound, plus noise.
Videos have several events that sometimes overlap. Strides are the real ones (video 2.56 s, audio 0.96 s).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.activitynet import CSV_COLUMNS
from utilities.errors import InputError
from utilities.files import atomic_path

VERSION = 1
VIDEO_STRIDE_S = 64 / 25
AUDIO_STRIDE_S = 0.96
D_VID, D_AUD = 1024, 128
NOISE = 0.5

SUBJECTS = ["man", "woman", "boy", "girl", "dog", "child"]
ACTIONS = [  # (present, progressive)
    ("plays", "playing"),
    ("throws", "throwing"),
    ("kicks", "kicking"),
    ("paints", "painting"),
    ("cleans", "cleaning"),
    ("carries", "carrying"),
    ("washes", "washing"),
    ("pushes", "pushing"),
]
OBJECTS = ["guitar", "ball", "drum", "fence", "car", "kite", "bike", "box"]
PLACES = ["in a park", "on a beach", "in a kitchen", "in a gym", "on a street"]


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    train_meta_path: Path
    val_1_meta_path: Path
    val_2_meta_path: Path
    train_json: Path
    val_1_json: Path  # references restricted to the videos with features (the *_no_missings files)
    val_2_json: Path
    video_features_path: Path
    audio_features_path: Path

    @classmethod
    def under(cls, root: Path) -> DemoPaths:
        return cls(
            root=root,
            train_meta_path=root / "train.csv",
            val_1_meta_path=root / "val_1.csv",
            val_2_meta_path=root / "val_2.csv",
            train_json=root / "train.json",
            val_1_json=root / "val_1_no_missings.json",
            val_2_json=root / "val_2_no_missings.json",
            video_features_path=root / "i3d_25fps_stack64step64_2stream_npy",
            audio_features_path=root / "vggish_npy",
        )

    def config_overrides(self) -> dict[str, str]:
        """The `Config` settings that point a run at the demo data."""
        return {
            "train_meta_path": str(self.train_meta_path),
            "val_1_meta_path": str(self.val_1_meta_path),
            "val_2_meta_path": str(self.val_2_meta_path),
            "video_features_path": str(self.video_features_path),
            "audio_features_path": str(self.audio_features_path),
            "reference_paths": [str(self.val_1_json), str(self.val_2_json)],
        }


@dataclass(frozen=True)
class Event:
    start: float
    end: float
    subject: int
    action: int
    object: int


def ensure_demo_dataset(root: str | Path, seed: int = 0, n_train: int = 160, n_val: int = 40) -> DemoPaths:
    """Generate the demo dataset into `root` once (in a temporary folder, renamed when complete) and reuse a
    complete one with the same parameters."""
    root = Path(root)
    params = {"version": VERSION, "seed": seed, "n_train": n_train, "n_val": n_val}
    if _read_marker(root) == params:
        return DemoPaths.under(root)
    if root.exists() and any(root.iterdir()) and _read_marker(root) is None:
        raise InputError(f"{root}: exists and is not a demo dataset folder; choose another --demo_dir")
    root.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(root) as tmp:  # replaces an older demo (other parameters)
        _generate(DemoPaths.under(tmp), np.random.default_rng(seed), n_train, n_val)
        (tmp / "demo_info.json").write_text(json.dumps(params) + "\n")
    return DemoPaths.under(root)


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / "demo_info.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _generate(paths: DemoPaths, rng: np.random.Generator, n_train: int, n_val: int) -> None:
    for folder in (paths.video_features_path, paths.audio_features_path):
        folder.mkdir(parents=True)
    prototypes = {
        "subject": rng.normal(size=(len(SUBJECTS), D_AUD)),
        "sound": rng.normal(size=(len(ACTIONS), D_AUD)),
        "action": rng.normal(size=(len(ACTIONS), D_VID)),
        "object": rng.normal(size=(len(OBJECTS), D_VID)),
        "place": rng.normal(size=(len(PLACES), D_VID)),
    }
    videos = {}
    for i in range(n_train + n_val + 2):
        duration = round(float(rng.uniform(20, 90)), 2)
        place = int(rng.integers(len(PLACES)))
        videos[f"v_demo{i:07d}"] = (duration, place, _events(rng, duration))
    ids = list(videos)
    train_ids, val_ids, no_features = ids[:n_train], ids[n_train : n_train + n_val], ids[n_train + n_val :]
    for video_id in train_ids + val_ids:
        _write_features(paths, video_id, *videos[video_id], prototypes, rng)

    train = {v: _annotate(rng, videos[v]) for v in train_ids}
    val_1 = {v: _annotate(rng, videos[v]) for v in val_ids + no_features}
    val_2 = {v: _annotate(rng, videos[v], jitter=1.0) for v in val_ids + no_features}
    _write_json(paths.train_json, train)
    for name, refs in (("val_1", val_1), ("val_2", val_2)):
        _write_json(paths.root / f"{name}.json", refs)
        _write_json(paths.root / f"{name}_no_missings.json", {v: refs[v] for v in val_ids})
    _write_csv(paths.train_meta_path, "train", train)
    _write_csv(paths.val_1_meta_path, "val_1", {v: val_1[v] for v in val_ids})
    _write_csv(paths.val_2_meta_path, "val_2", {v: val_2[v] for v in val_ids})
    (paths.root / "available_mp4.txt").write_text("\n".join(train_ids + val_ids) + "\n")


def _events(rng: np.random.Generator, duration: float) -> list[Event]:
    """2–4 events, each 15–45 % of the video, placed at random (so they sometimes overlap)."""
    events = []
    for _ in range(int(rng.integers(2, 5))):
        length = duration * rng.uniform(0.15, 0.45)
        start = rng.uniform(0, duration - length)
        events.append(
            Event(
                round(float(start), 2),
                round(float(start + length), 2),
                int(rng.integers(len(SUBJECTS))),
                int(rng.integers(len(ACTIONS))),
                int(rng.integers(len(OBJECTS))),
            )
        )
    return sorted(events, key=lambda e: e.start)


def _write_features(paths: DemoPaths, video_id: str, duration, place, events, prototypes, rng) -> None:
    n_video = max(1, int(duration / VIDEO_STRIDE_S))
    n_audio = max(1, int(duration / AUDIO_STRIDE_S))
    rgb = np.tile(prototypes["place"][place], (n_video, 1)) * 0.5
    flow = np.zeros((n_video, D_VID))
    audio = np.zeros((n_audio, D_AUD))
    video_times = (np.arange(n_video) + 0.5) * VIDEO_STRIDE_S
    audio_times = (np.arange(n_audio) + 0.5) * AUDIO_STRIDE_S
    for e in events:
        in_video = (video_times >= e.start) & (video_times <= e.end)
        in_audio = (audio_times >= e.start) & (audio_times <= e.end)
        rgb[in_video] += prototypes["object"][e.object]
        flow[in_video] += prototypes["action"][e.action]
        audio[in_audio] += prototypes["subject"][e.subject] + prototypes["sound"][e.action]
    rgb += rng.normal(scale=NOISE, size=rgb.shape)
    flow += rng.normal(scale=NOISE, size=flow.shape)
    audio = np.maximum(audio + rng.normal(scale=NOISE, size=audio.shape), 0)  # VGGish values are non-negative
    np.save(paths.video_features_path / f"{video_id}_rgb.npy", rgb.astype(np.float32))
    np.save(paths.video_features_path / f"{video_id}_flow.npy", flow.astype(np.float32))
    np.save(paths.audio_features_path / f"{video_id}.npy", audio.astype(np.float32))


def _caption(rng: np.random.Generator, event: Event, place: int) -> str:
    present, progressive = ACTIONS[event.action]
    verb = present if rng.random() < 0.5 else f"is {progressive}"
    return f"A {SUBJECTS[event.subject]} {verb} a {OBJECTS[event.object]} {PLACES[place]}"


def _annotate(rng: np.random.Generator, video, jitter: float = 0.0) -> dict:
    """One annotator's reference entry; `jitter` seconds of boundary noise for a second annotator."""
    duration, place, events = video
    timestamps = []
    for e in events:
        start = min(max(e.start + rng.uniform(-jitter, jitter), 0.0), duration)
        end = min(max(e.end + rng.uniform(-jitter, jitter), start + 0.5), duration)
        timestamps.append([round(start, 2), round(end, 2)])
    sentences = [(" " if i else "") + _caption(rng, e, place) + "." for i, e in enumerate(events)]
    return {"duration": duration, "timestamps": timestamps, "sentences": sentences}


def _write_json(path: Path, references: dict) -> None:
    path.write_text(json.dumps(references))


def _write_csv(path: Path, phase: str, references: dict) -> None:
    """The real CSV format; captions cleaned like the originals (no '.', stripped)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        idx = 0
        for video_id, ref in references.items():
            for (start, end), sentence in zip(ref["timestamps"], ref["sentences"], strict=True):
                caption = sentence.replace(".", "").strip()
                writer.writerow([video_id, caption, start, end, ref["duration"], phase, idx])
                idx += 1
