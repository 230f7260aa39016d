"""Small synthetic but learnable datasets, generated on demand in the real on-disk formats: an ActivityNet
Captions look-alike for BMHRL and an LRMovieNet look-alike for LR²PPO (`ensure_ranking_demo`, at the end).

Because they are written in the real formats (CSVs, JSONs, `.npy` directories; JSONs and HDF5), the demos run
exactly the code real data runs. The captioning demo is learnable: each caption comes from a small grammar ("A man plays a guitar in a park"),
and over each event's time span the video features carry the event's action and object (rgb: object + the
video's place, flow: action) while the audio features carry its subject and the action's sound, plus noise.
Videos have several events that sometimes overlap. Strides are the real ones (video 2.56 s, audio 0.96 s).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from datasets.captioning.activitynet import CSV_COLUMNS
from datasets.features import STRIDE_S
from utilities.errors import InputError
from utilities.files import atomic_path

VERSION = 1
VIDEO_STRIDE_S = STRIDE_S["video"]
AUDIO_STRIDE_S = STRIDE_S["audio"]
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
    _build_once(
        root, params, lambda tmp: _generate(DemoPaths.under(tmp), np.random.default_rng(seed), n_train, n_val)
    )
    return DemoPaths.under(root)


def _build_once(root: Path, params: dict, generate: Callable[[Path], None]) -> None:
    """Run `generate(folder)` in a temporary folder and rename it to `root`, unless `root` already holds a
    complete demo generated with the same `params` (recorded in its demo_info.json)."""
    if root.exists() and not root.is_dir():
        raise InputError(f"{root}: a file, not a folder; --demo_dir names the folder the demo data go to")
    if _read_marker(root) == params:
        return
    if root.exists() and any(root.iterdir()) and _read_marker(root) is None:
        raise InputError(f"{root}: exists and is not a demo dataset folder; choose another --demo_dir")
    root.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(root) as tmp:  # replaces an older demo (other parameters)
        tmp.mkdir()
        generate(tmp)
        (tmp / "demo_info.json").write_text(json.dumps(params) + "\n")


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


# --- LR²PPO label ranking: a small LRMovieNet look-alike ------------------------------------------------------

RANKING_VERSION = 1
CONCEPTS = [
    "beach",
    "night",
    "car",
    "wedding",
    "fight",
    "rain",
    "city",
    "forest",
    "kitchen",
    "dance",
    "horse",
    "office",
]
SOURCE_SUFFIXES, TARGET_SUFFIXES = (
    ("scene", "shot", "moment"),
    ("vibe", "setting", "theme"),
)  # two vocabularies


@dataclass(frozen=True)
class RankingDemoPaths:
    root: Path
    first_stage: Path  # source-vocabulary clips with graded targets: stage 1 (pointwise)
    first_second_stage: (
        Path  # source + target clips: stage 3 (PPO; targets present but unused, as the original)
    )
    pairs: Path  # the same clips with preference pairs `index`: stage 2 (reward model)
    val: Path  # target-vocabulary clips with graded targets: selection
    test: Path  # target-vocabulary clips with graded targets: reporting
    features_h5: Path
    seq_length: int
    visual_feat_dim: int
    max_imgs: int
    max_tags: int  # labels per clip

    @classmethod
    def under(
        cls, root: Path, seq_length: int, dim: int, max_imgs: int, labels_per_clip: int
    ) -> RankingDemoPaths:
        return cls(
            root=root,
            first_stage=root / "first_stage_data.json",
            first_second_stage=root / "first_second_stage_data.json",
            pairs=root / "first_second_data_pair.json",
            val=root / "val_data.json",
            test=root / "test_data.json",
            features_h5=root / "clean_feat.h5",
            seq_length=seq_length,
            visual_feat_dim=dim,
            max_imgs=max_imgs,
            max_tags=labels_per_clip,
        )

    def config_overrides(self, stage: str) -> dict[str, str | int]:
        """The `Config` settings that point stage `pointwise`, `reward`, `ppo` or `eval` at the demo data."""
        train = {"pointwise": self.first_stage, "reward": self.pairs, "ppo": self.first_second_stage}
        if stage not in (*train, "eval"):
            raise ValueError(f"unknown stage {stage!r}")
        overrides: dict[str, str | int] = {
            "features_h5": str(self.features_h5),
            "dev_path": str(self.val),
            "test_path": str(self.test),
            "seq_length": self.seq_length,
            "visual_feat_dim": self.visual_feat_dim,
            "max_imgs": self.max_imgs,
        }
        if stage in train:
            overrides["train_path"] = str(train[stage])
        return overrides


def ensure_ranking_demo(
    root: str | Path,
    seed: int = 0,
    n_source: int = 200,
    n_target: int = 120,
    n_val: int = 60,
    n_test: int = 60,
    seq_length: int = 8,
    dim: int = 32,
    max_imgs: int = 4,
    labels_per_clip: int = 10,
    pair_fraction: float = 0.3,
    domain_shift: float = 0.5,
) -> RankingDemoPaths:
    """Generate (once; reused when the parameters match) a learnable LRMovieNet look-alike in the real formats.

    Each clip shows one main concept strongly and two secondary ones weakly in its frames; a label names one
    concept. Relevance: 2 (high) for the main concept's labels, 1 (medium) for a secondary concept's, 0 (low)
    for the rest. Source and target vocabularies are disjoint and describe the same concepts through different
    text-feature maps: the target map is the source one turned by `domain_shift` (0 same, 1 orthogonal) of a
    right angle towards another. So a scorer trained on the source labels transfers only partly, and the
    target pairs (the reward model's data) hold what is needed to adapt.
    """
    root = Path(root)
    sizes = {"seq_length": seq_length, "dim": dim, "max_imgs": max_imgs, "labels_per_clip": labels_per_clip}
    params = {
        "kind": "ranking",
        "version": RANKING_VERSION,
        "seed": seed,
        "clips": [n_source, n_target, n_val, n_test],
        "pair_fraction": pair_fraction,
        "domain_shift": domain_shift,
        **sizes,
    }
    if labels_per_clip < 6:
        raise ValueError("labels_per_clip must be at least 6 (2 high, 2 medium, 2 low)")
    _build_once(
        root,
        params,
        lambda tmp: _generate_ranking(
            RankingDemoPaths.under(tmp, **sizes),
            np.random.default_rng(seed),
            (n_source, n_target, n_val, n_test),
            pair_fraction,
            domain_shift,
        ),
    )
    return RankingDemoPaths.under(root, **sizes)


def _orthonormalize(m: np.ndarray) -> np.ndarray:
    """Gram–Schmidt on the columns (QR with the signs fixed, so an orthogonal matrix comes back unchanged)."""
    q, r = np.linalg.qr(m)
    return q * np.sign(np.diag(r))


@dataclass(frozen=True)
class _DemoLabel:
    name: str
    concept: int
    meaning: np.ndarray  # the concept seen through its vocabulary's text map
    identity: np.ndarray  # what makes this label's features its own


def _generate_ranking(
    paths: RankingDemoPaths,
    rng: np.random.Generator,
    counts: tuple[int, ...],
    pair_fraction: float,
    shift: float,
) -> None:
    dim, seq_length = paths.visual_feat_dim, paths.seq_length
    concepts = rng.normal(size=(len(CONCEPTS), dim))
    concepts *= np.sqrt(dim) / np.linalg.norm(
        concepts, axis=1, keepdims=True
    )  # about unit scale per dimension
    image_map, source_map, other = (_orthonormalize(rng.normal(size=(dim, dim))) for _ in range(3))
    angle = shift * np.pi / 2
    target_map = _orthonormalize(np.cos(angle) * source_map + np.sin(angle) * other)
    token_weight = np.where(np.arange(seq_length) < max(1, seq_length // 2), 1.0, 0.3)[:, None]
    vocabularies = {
        domain: [
            _DemoLabel(f"{concept} {suffix}", c, concepts[c] @ text_map.T, rng.normal(size=dim))
            for c, concept in enumerate(CONCEPTS)
            for suffix in suffixes
        ]
        for domain, suffixes, text_map in (
            ("source", SOURCE_SUFFIXES, source_map),
            ("target", TARGET_SUFFIXES, target_map),
        )
    }
    per_level = {2: 2, 1: 2, 0: paths.max_tags - 4}  # labels per clip of each relevance level

    def clip(n: int, domain: str, h5: h5py.File) -> dict:
        main, *secondary = rng.choice(len(CONCEPTS), size=3, replace=False)
        level_of = {c: 2 if c == main else 1 if c in secondary else 0 for c in range(len(CONCEPTS))}
        picked = []
        for level, k in per_level.items():
            candidates = [label for label in vocabularies[domain] if level_of[label.concept] == level]
            picked += [(level, candidates[i]) for i in rng.choice(len(candidates), size=k, replace=False)]
        picked = [picked[i] for i in rng.permutation(len(picked))]
        text = np.stack(
            [
                token_weight * label.meaning + 0.3 * label.identity + 0.5 * rng.normal(size=(seq_length, dim))
                for _, label in picked
            ]
        )
        n_frames = int(rng.integers(2, 2 * paths.max_imgs))  # fewer or more frames than slots
        presence = rng.random((n_frames, 2)) < 0.7
        presence[rng.integers(n_frames, size=2), [0, 1]] = (
            True  # each secondary concept in at least one frame
        )
        scenes = concepts[main] + 0.5 * presence @ concepts[secondary]
        frames = (scenes + 0.5 * rng.normal(size=(n_frames, dim))) @ image_map.T
        clip_id = f"demo{n:05d}"
        group = h5.create_group(clip_id)
        group["text_emb"] = text.astype(np.float32)
        group["img_emb"] = frames[None].astype(np.float32)
        return {"id": clip_id, "tags": [{"tag": label.name, "target": level} for level, label in picked]}

    with h5py.File(paths.features_h5, "w") as h5:
        numbers = iter(range(sum(counts)))
        source, target, val, test = (
            [clip(next(numbers), domain, h5) for _ in range(n)]
            for n, domain in zip(counts, ("source", "target", "target", "target"), strict=True)
        )

    def with_pairs(entry: dict) -> dict:
        """A random `pair_fraction` of the clip's preference pairs (the original kept 10 %)."""
        levels = [tag["target"] for tag in entry["tags"]]
        ordered = [[i, j] for i, a in enumerate(levels) for j, b in enumerate(levels) if a > b]
        keep = rng.random(len(ordered)) < pair_fraction
        return {**entry, "index": [pair for pair, k in zip(ordered, keep, strict=True) if k]}

    for path, clips in (
        (paths.first_stage, source),
        (paths.first_second_stage, source + target),
        (paths.pairs, [with_pairs(entry) for entry in source + target]),
        (paths.val, val),
        (paths.test, test),
    ):
        path.write_text(json.dumps(clips))


# --- LETOR: a source and a shifted target learning-to-rank dataset in the official fold layout ------------------

LETOR_VERSION = 1


@dataclass(frozen=True)
class LetorDemoPaths:
    root: Path
    source_dir: Path  # <source_dir>/Fold{1,2}/{train,vali,test}.txt, `source_feat_dim` features, labels 0-4
    target_dir: Path  # the same layout, `target_feat_dim` features, labels 0-2
    source_feat_dim: int
    target_feat_dim: int


def ensure_letor_demo(
    root: str | Path,
    seed: int = 0,
    source_feat_dim: int = 136,
    target_feat_dim: int = 46,
    latent_dim: int = 6,
    queries: tuple[int, int, int, int] = (80, 40, 30, 40),
    align_target_queries: int = 4,
    domain_shift: float = 0.8,
) -> LetorDemoPaths:
    """Generate (once; reused when the parameters match) two LETOR datasets of the real widths and label ranges.

    Each document has a latent vector z; each query shifts its documents' z by a query offset (so some queries
    have no relevant document, as in MQ2008). A domain sees z through its own random linear map plus noise.
    Relevance is a thresholded projection of z: the source's on a direction w (labels 0-4), the target's on w
    turned by `domain_shift` of a right angle (labels 0-2), so a ranker of source relevance is measurably worse on
    the target. `queries` = (source train, target train, vali, test) per fold; the alignment fold (Fold2) has
    only `align_target_queries` target training queries, as labelled target data is what transfer lacks.
    """
    root = Path(root)
    params = {
        "kind": "letor",
        "version": LETOR_VERSION,
        "seed": seed,
        "widths": [source_feat_dim, target_feat_dim, latent_dim],
        "queries": list(queries),
        "align_target_queries": align_target_queries,
        "domain_shift": domain_shift,
    }
    paths = LetorDemoPaths(root, root / "MSLR-WEB10K", root / "MQ2008", source_feat_dim, target_feat_dim)

    def generate(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        w = _orthonormalize(rng.normal(size=(latent_dim, 2)))
        angle = domain_shift * np.pi / 2
        directions = {"source": w[:, 0], "target": np.cos(angle) * w[:, 0] + np.sin(angle) * w[:, 1]}
        widths = {"source": source_feat_dim, "target": target_feat_dim}
        maps = {d: rng.normal(size=(latent_dim, widths[d])) / np.sqrt(latent_dim) for d in widths}
        thresholds = {"source": [0.4, 1.0, 1.5, 2.0], "target": [0.5, 1.2]}
        n_source, n_target, n_vali, n_test = queries
        for fold, n_target_train in (("Fold1", n_target), ("Fold2", align_target_queries)):
            counts = {
                "source": {"train": n_source, "vali": n_vali, "test": n_test},
                "target": {"train": n_target_train, "vali": n_vali, "test": n_test},
            }
            for domain, splits in counts.items():
                folder = tmp / getattr(paths, f"{domain}_dir").name / fold
                folder.mkdir(parents=True)
                qid = 1 if domain == "source" else 10_000
                for split, n_queries in splits.items():
                    lines = []
                    for _ in range(n_queries):
                        n_docs = int(rng.integers(8, 33))
                        z = rng.normal(size=(n_docs, latent_dim)) + 0.7 * rng.normal(size=latent_dim)
                        labels = np.searchsorted(thresholds[domain], z @ directions[domain])
                        features = z @ maps[domain] + 0.3 * rng.normal(size=(n_docs, widths[domain]))
                        for j in range(n_docs):
                            values = " ".join(f"{i + 1}:{v:.5f}" for i, v in enumerate(features[j]))
                            lines.append(f"{labels[j]} qid:{qid} {values} #docid = {domain}-{qid}-{j}")
                        qid += 1
                    (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")

    _build_once(root, params, generate)
    return paths
