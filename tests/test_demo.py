"""The demo dataset: real formats, deterministic, reused from its cache, and learnable."""

from __future__ import annotations

import numpy as np
import pytest

from datasets.captioning.activitynet import read_captions_csv
from datasets.demo import ACTIONS, AUDIO_STRIDE_S, VIDEO_STRIDE_S, ensure_demo_dataset
from datasets.features import open_feature_store
from datasets.vocabulary import build_vocabulary, tokenize
from evaluation.formats import load_reference
from utilities.errors import InputError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0, n_train=40, n_val=10)


def test_real_formats_and_sizes(demo):
    train = read_captions_csv(demo.train_meta_path)
    val_1, val_2 = read_captions_csv(demo.val_1_meta_path), read_captions_csv(demo.val_2_meta_path)
    assert len(train.video_ids) == 40 and val_1.video_ids == val_2.video_ids and len(val_1.video_ids) == 10
    references = load_reference(demo.val_1_json)
    assert list(references) == val_1.video_ids
    assert len(load_reference(demo.root / "val_1.json")) == 12  # 2 videos without features
    assert sum(len(r) for r in references.values()) == len(val_1.segments)
    video = open_feature_store(demo.video_features_path, "video", 1024)
    audio = open_feature_store(demo.audio_features_path, "audio", 128)
    for s in train.segments[:10]:
        assert len(video.rows(s.video_id)) == int(s.duration / VIDEO_STRIDE_S)
        assert len(audio.rows(s.video_id)) == int(s.duration / AUDIO_STRIDE_S)
        assert audio.rows(s.video_id).min() >= 0
    vocab = build_vocabulary([s.caption for s in train.segments])
    val_tokens = {t for tokens in tokenize([s.caption for s in val_2.segments]) for t in tokens}
    assert val_tokens <= set(vocab.itos)


def test_deterministic_and_reused(demo, tmp_path):
    again = ensure_demo_dataset(tmp_path / "other", seed=0, n_train=40, n_val=10)
    assert again.train_meta_path.read_bytes() == demo.train_meta_path.read_bytes()
    name = "v_demo0000003.npy"
    assert (again.audio_features_path / name).read_bytes() == (demo.audio_features_path / name).read_bytes()
    mtime = again.train_meta_path.stat().st_mtime_ns
    ensure_demo_dataset(tmp_path / "other", seed=0, n_train=40, n_val=10)
    assert again.train_meta_path.stat().st_mtime_ns == mtime  # the complete cache is reused
    ensure_demo_dataset(tmp_path / "other", seed=1, n_train=40, n_val=10)  # other parameters: regenerated
    assert again.train_meta_path.read_bytes() != demo.train_meta_path.read_bytes()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not a demo dataset folder"):
        ensure_demo_dataset(tmp_path / "mine")


def test_segment_features_carry_the_action(demo):
    """A nearest-centroid classifier on the mean video crop predicts the caption's action well above chance."""
    video = open_feature_store(demo.video_features_path, "video", 1024)

    def examples(path):
        features, labels = [], []
        for s in read_captions_csv(path).segments:
            words = s.caption.lower().split()
            labels.append(next(i for i, forms in enumerate(ACTIONS) if set(forms) & set(words)))
            features.append(video.crop(s.video_id, s.start, s.end, s.duration).mean(0))
        return np.stack(features), np.array(labels)

    x, y = examples(demo.train_meta_path)
    centroids = np.stack([x[y == k].mean(0) for k in range(len(ACTIONS))])
    xv, yv = examples(demo.val_1_meta_path)
    predicted = np.argmin(((xv[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == yv).mean() > 0.5  # chance is 1/8
