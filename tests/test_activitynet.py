"""Annotation readers, the caption dataset, batches and loaders, on the real annotation files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets.captioning.activitynet import (
    CSV_COLUMNS,
    build_caption_dataset,
    read_captions_csv,
)
from datasets.features import pack_directory
from datasets.loader import CaptionLoader
from datasets.vocabulary import build_vocabulary
from evaluation.formats import load_reference
from utilities.config import Config
from utilities.errors import InputError

HEADER = "\t".join(CSV_COLUMNS) + "\n"


@pytest.mark.parametrize(
    ("name", "segments", "videos", "start_ge_end", "end_gt_duration"),
    [("train", 34171, 9167, 4, 239), ("val_1", 15921, 4483, 0, 122), ("val_2", 15505, 4453, 0, 102)],
)
def test_real_csv_counts(shared_data, name, segments, videos, start_ge_end, end_gt_duration):
    annotations = read_captions_csv(shared_data / "activitynet" / f"{name}.csv")
    assert (len(annotations.segments), len(annotations.video_ids)) == (segments, videos)
    assert annotations.anomalies.as_dict() == {
        "start_ge_end": start_ge_end,
        "end_gt_duration": end_gt_duration,
    }


def test_real_rows_parse_exactly(shared_data):
    segments = read_captions_csv(shared_data / "activitynet" / "train.csv").segments
    first = segments[0]
    assert (first.video_id, first.start, first.end, first.duration, first.phase, first.idx) == (
        "v_QOlSCBRmfWY",
        0.83,
        19.86,
        82.73,
        "train",
        0,
    )
    quoted = next(s for s in segments if s.video_id == "v_aDDq5ofaFHI" and "AMERICAN" in s.caption)
    assert '"THE AMERICAN DREAM"' in quoted.caption  # pandas quoting undone


def test_real_reference_json(shared_data):
    references = load_reference(shared_data / "activitynet" / "val_1_no_missings.json")
    assert len(references) == 4483
    first = references["v_uqiMw7tQ1Cc"][0]
    assert (first.start, first.end) == (0.28, 55.15)


def write_csv(path, rows, header=HEADER):
    path.write_text(header + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return path


def test_bad_csv_rows_name_file_and_line(tmp_path):
    good = ["v_a", "A man", 0.5, 2.0, 10.0, "train"]
    path = write_csv(tmp_path / "t.csv", [[*good, 0], ["v_b", "A dog", "1,5", 2.0, 10.0, "train", 1]])
    with pytest.raises(InputError, match=r"t\.csv: line 3 \(v_b\): start '1,5' is not a number"):
        read_captions_csv(path)
    wrong_order = "\t".join(["video_id", "start", "caption", "end", "duration", "phase", "idx"]) + "\n"
    with pytest.raises(InputError, match=r"t\.csv: line 1: expected the tab-separated header"):
        read_captions_csv(write_csv(tmp_path / "t.csv", [[*good, 0]], header=wrong_order))
    with pytest.raises(InputError, match=r"line 3 \(v_a\): idx '5' must equal the 0-based row number 1"):
        read_captions_csv(write_csv(tmp_path / "t.csv", [[*good, 0], [*good, 5]]))
    with pytest.raises(InputError, match="line 2: expected 7 tab-separated fields, got 6"):
        read_captions_csv(write_csv(tmp_path / "t.csv", [good]))


def random_features(folder_video, folder_audio, video_ids, durations, seed=0):
    """Random features with the real strides, in the original directory layout."""
    rng = np.random.default_rng(seed)
    folder_video.mkdir(exist_ok=True)
    folder_audio.mkdir(exist_ok=True)
    for vid in video_ids:
        tv, ta = max(1, int(durations[vid] * 25 / 64)), max(1, int(durations[vid] / 0.96))
        np.save(folder_video / f"{vid}_rgb.npy", rng.random((tv, 1024), dtype=np.float32))
        np.save(folder_video / f"{vid}_flow.npy", rng.random((tv, 1024), dtype=np.float32))
        np.save(folder_audio / f"{vid}.npy", rng.random((ta, 128), dtype=np.float32))


def config(tmp_path, **overrides) -> Config:
    settings = dict(
        modality="audio_video",
        video_features_path=str(tmp_path / "i3d"),
        audio_features_path=str(tmp_path / "vggish"),
        d_vid=1024,
        d_aud=128,
        skip_missing_features=False,
        seed=0,
    )
    return Config(**{**settings, **overrides})


@pytest.fixture
def real_subset(shared_data, tmp_path):
    """Random features for the first 200 videos of the real train.csv."""
    annotations = read_captions_csv(shared_data / "activitynet" / "train.csv")
    ids = annotations.video_ids[:200]
    durations = {s.video_id: s.duration for s in annotations.segments}
    random_features(tmp_path / "i3d", tmp_path / "vggish", ids, durations)
    vocab = build_vocabulary([s.caption for s in annotations.segments])
    return shared_data / "activitynet" / "train.csv", set(ids), vocab


def test_missing_features_are_an_error_or_skipped_with_a_count(real_subset, tmp_path, caplog):
    train_csv, ids, vocab = real_subset
    with pytest.raises(InputError, match=r"train\.csv: 8967 of 9167 videos lack features.*first: v_"):
        build_caption_dataset(config(tmp_path), train_csv, vocab)
    dataset = build_caption_dataset(config(tmp_path, skip_missing_features=True), train_csv, vocab)
    assert {s.video_id for s in dataset.segments} == ids
    assert "dropped" in caplog.text and "(8967 videos)" in caplog.text


def test_real_annotations_batches_with_masks_and_exact_timestamps(real_subset, tmp_path):
    train_csv, _, vocab = real_subset
    dataset = build_caption_dataset(config(tmp_path, skip_missing_features=True), train_csv, vocab)
    loader = CaptionLoader(dataset, batch_size=16, shuffle=False)
    n_seen = 0
    for batch in loader:
        segments = dataset.segments[n_seen : n_seen + len(batch)]
        n_seen += len(batch)
        assert batch.starts == [s.start for s in segments]  # file order, exact CSV values
        assert batch.raw_captions == [s.caption for s in segments]
        assert batch.captions[:, 0].eq(vocab.start_idx).all()
        assert batch.caption_mask.sum(1).tolist() == batch.caption_lengths.tolist()
        assert batch.captions[~batch.caption_mask].eq(vocab.pad_idx).all()
        for name in ("video", "audio"):
            features, mask = getattr(batch, name), getattr(batch, f"{name}_mask")
            assert mask.any(1).all()  # never an empty crop
            assert features[~mask].eq(0).all()
    assert n_seen == len(dataset) == 722  # rows of the first 200 videos (awk)
    first = dataset.segments[0]  # v_QOlSCBRmfWY 0.83–19.86 of 82.73 s
    rgb = np.load(tmp_path / "i3d" / "v_QOlSCBRmfWY_rgb.npy")
    flow = np.load(tmp_path / "i3d" / "v_QOlSCBRmfWY_flow.npy")
    s = len(rgb)  # int(82.73·25/64) = 32 → rows int(32·0.83/82.73)=0 .. int(32·19.86/82.73)=7
    assert s == 32
    batch = dataset.collate([dataset[0]])
    torch.testing.assert_close(batch.video[0], torch.from_numpy((rgb + flow)[0:7]))
    assert (batch.starts[0], batch.ends[0], repr(first.end)) == (0.83, 19.86, "19.86")


def test_seeded_shuffle_and_workers_with_hdf5(real_subset, tmp_path):
    train_csv, _, vocab = real_subset
    pack_directory(tmp_path / "i3d", "video", tmp_path / "video.h5", 1024)
    pack_directory(tmp_path / "vggish", "audio", tmp_path / "audio.h5", 128)
    cfg = config(
        tmp_path,
        skip_missing_features=True,
        video_features_path=str(tmp_path / "video.h5"),
        audio_features_path=str(tmp_path / "audio.h5"),
    )
    dataset = build_caption_dataset(cfg, train_csv, vocab)

    def epoch(loader, e):
        loader.sampler.set_epoch(e)
        return [b for b in loader]

    serial = CaptionLoader(dataset, 64, shuffle=True, seed=3)
    parallel = CaptionLoader(dataset, 64, shuffle=True, seed=3, num_workers=2)
    a, b = epoch(serial, 0), epoch(parallel, 0)
    assert [x.indices for x in a] == [x.indices for x in b]
    assert all(
        torch.equal(x.video, y.video) and torch.equal(x.audio_mask, y.audio_mask)
        for x, y in zip(a, b, strict=True)
    )
    assert [x.indices for x in a] != [x.indices for x in epoch(serial, 1)]
    assert [x.indices for x in a] != [x.indices for x in epoch(CaptionLoader(dataset, 64, True, seed=4), 0)]
    assert sorted(i for x in a for i in x.indices) == sorted(s.idx for s in dataset.segments)


def test_a_tiny_model_trains_on_real_annotation_batches(real_subset, tmp_path):
    """End to end: real annotations + features in the original layout → batches → loss → optimiser step."""
    from datasets.embeddings import embedding_matrix
    from model.blocks import VocabularyEmbedder

    train_csv, _, vocab = real_subset
    dataset = build_caption_dataset(config(tmp_path, skip_missing_features=True), train_csv, vocab)
    loader = CaptionLoader(dataset, batch_size=32, shuffle=True, seed=0)
    torch.manual_seed(0)
    embed = VocabularyEmbedder(embedding_matrix("random", vocab.itos, 16))
    video_proj, out = torch.nn.Linear(1024, 16), torch.nn.Linear(16, len(vocab))
    optimiser = torch.optim.Adam([*video_proj.parameters(), *out.parameters()], lr=1e-2)
    losses = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            mask = batch.video_mask[..., None]
            video = (batch.video * mask).sum(1) / mask.sum(1)  # masked mean over real rows only
            hidden = embed(batch.captions[:, :-1]) + video_proj(video)[:, None]
            logits = out(hidden)
            target, target_mask = batch.captions[:, 1:], batch.caption_mask[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[target_mask], target[target_mask])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
