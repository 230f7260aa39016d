"""Samples/s of the caption data path: npy directory vs packed HDF5, 0 vs N DataLoader workers.

A synthetic set with the real sizes (≈10k videos, T≈50×1024 video = rgb + flow, T≈120×128 audio, ≈3.7
segments per video) is written once into --root (several GB at the default size) and reused.

    python benchmarks/bench_data.py [--videos 10000] [--batches 100] [--root ./.cache/bench_data]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.captioning.activitynet import CSV_COLUMNS, build_caption_dataset, read_captions_csv
from datasets.features import pack_directory
from datasets.loader import CaptionLoader
from datasets.vocabulary import build_vocabulary
from utilities.config import Config
from utilities.files import atomic_path

WORDS = ["a", "man", "woman", "dog", "plays", "runs", "ball", "guitar", "in", "the", "park"]


def make_synthetic(root: Path, n_videos: int, seed: int = 0) -> Path:
    """train.csv + i3d/ + vggish/ with the real shapes; skipped when already complete."""
    csv_path = root / "train.csv"
    if csv_path.is_file():
        return csv_path
    rng = np.random.default_rng(seed)
    video, audio = root / "i3d", root / "vggish"
    video.mkdir(parents=True, exist_ok=True)
    audio.mkdir(exist_ok=True)
    rows = []
    for i in range(n_videos):
        vid = f"v_bench{i:07d}"
        tv = int(rng.integers(30, 71))
        duration = round(tv * 64 / 25, 2)
        ta = int(duration / 0.96)
        np.save(video / f"{vid}_rgb.npy", rng.random((tv, 1024), dtype=np.float32))
        np.save(video / f"{vid}_flow.npy", rng.random((tv, 1024), dtype=np.float32))
        np.save(audio / f"{vid}.npy", rng.random((ta, 128), dtype=np.float32))
        for _ in range(int(rng.integers(2, 6))):
            start = round(float(rng.uniform(0, duration * 0.7)), 2)
            end = round(float(rng.uniform(start + 1, duration)), 2)
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 20))))
            rows.append([vid, caption, start, end, duration, "train", len(rows)])
        if i % 1000 == 999:
            print(f"  wrote {i + 1} videos", flush=True)
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    return csv_path


def samples_per_second(dataset, batch_size: int, workers: int, n_batches: int, repeats: int) -> float:
    """The best of `repeats` timed runs (other load on the machine only ever slows a run down)."""
    loader = CaptionLoader(dataset, batch_size, shuffle=True, seed=0, num_workers=workers)
    rates = []
    for epoch in range(repeats):
        loader.sampler.set_epoch(epoch)
        iterator = iter(loader)
        next(iterator)  # worker start-up is not data throughput
        n, t0 = 0, time.perf_counter()
        for _, batch in zip(range(n_batches), iterator, strict=False):
            n += len(batch)
        rates.append(n / (time.perf_counter() - t0))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default="./.cache/bench_data")
    args = parser.parse_args()
    root = Path(args.root) / f"videos{args.videos}"

    t0 = time.perf_counter()
    csv_path = make_synthetic(root, args.videos)
    for modality, folder, dim in (("video", root / "i3d", 1024), ("audio", root / "vggish", 128)):
        if not (root / f"{modality}.h5").is_file():
            pack_directory(folder, modality, root / f"{modality}.h5", dim)
    print(f"synthetic set ready in {time.perf_counter() - t0:.0f} s: {root}")

    layouts = {"npy": (root / "i3d", root / "vggish"), "hdf5": (root / "video.h5", root / "audio.h5")}
    results = {}
    vocab = None
    for layout, (video_path, audio_path) in layouts.items():
        cfg = Config(
            modality="audio_video",
            video_features_path=str(video_path),
            audio_features_path=str(audio_path),
            d_vid=1024,
            d_aud=128,
            skip_missing_features=False,
        )
        if vocab is None:
            vocab = build_vocabulary([s.caption for s in read_captions_csv(csv_path).segments])
        dataset = build_caption_dataset(cfg, csv_path, vocab)
        for workers in (0, args.workers):
            rate = samples_per_second(dataset, args.batch_size, workers, args.batches, args.repeats)
            results[(layout, workers)] = rate
            print(f"{layout:5s} workers={workers}: {rate:8.0f} samples/s", flush=True)
    baseline = results[("npy", 0)]  # the original data path: one np.load per sample, no workers
    for workers in (0, args.workers):
        print(
            f"hdf5 with {workers} workers / npy without workers: {results[('hdf5', workers)] / baseline:.1f}x"
        )
    same = results[("hdf5", args.workers)] / results[("npy", args.workers)]
    print(f"hdf5 / npy, both with {args.workers} workers: {same:.1f}x")


if __name__ == "__main__":
    main()
