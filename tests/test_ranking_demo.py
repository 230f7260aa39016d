"""The LR²PPO demo data (datasets/demo.py: ensure_ranking_demo): real formats, read by the LRMovieNet readers,
and the structure it promises (graded relevance, disjoint vocabularies, a domain gap that can be closed)."""

from __future__ import annotations

import numpy as np
import pytest

from datasets.demo import ensure_ranking_demo
from datasets.ranking.lrmovienet import (
    ClipDataset,
    ClipFeatures,
    PPOPairDataset,
    RewardPairDataset,
    RewardTripletDataset,
    read_clip_list,
)
from evaluation.ranking import clip_ndcg, mean_ndcg

SIZES = {"n_source": 80, "n_target": 40, "n_val": 30, "n_test": 30}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_ranking_demo(tmp_path_factory.mktemp("ranking") / "demo", seed=0, **SIZES)


def test_files_load_through_the_readers(demo):
    features = ClipFeatures(demo.features_h5, seq_length=demo.seq_length, dim=demo.visual_feat_dim)
    lists = {
        p.name: read_clip_list(p) for p in (demo.first_stage, demo.first_second_stage, demo.val, demo.test)
    }
    assert [len(c) for c in lists.values()] == [80, 120, 30, 30]
    pairs = read_clip_list(demo.pairs, with_pairs=True)
    assert [c.id for c in pairs.clips] == [c.id for c in lists["first_second_stage_data.json"].clips]
    for clips in [*lists.values(), pairs]:
        features.check(clips)
    item = ClipDataset(lists["val_data.json"], features, max_imgs=demo.max_imgs)[0]
    assert item.text.shape == (demo.max_tags, demo.seq_length, demo.visual_feat_dim)
    assert item.frames.shape == (demo.max_imgs, demo.visual_feat_dim)
    assert len(RewardPairDataset(pairs, features, demo.max_imgs)) > 5 * len(pairs)
    assert len(RewardTripletDataset(lists["val_data.json"], features, demo.max_imgs, per_clip=3)) == 90
    assert len(PPOPairDataset(lists["first_second_stage_data.json"], features, demo.max_imgs, 4)) == 480
    frame_counts = {features.n_frames(c.id) for c in lists["test_data.json"].clips}
    assert min(frame_counts) < demo.max_imgs < max(frame_counts)  # both cycling and truncation happen


def test_relevance_levels_and_disjoint_vocabularies(demo):
    source = read_clip_list(demo.first_stage).clips
    target = [c for c in read_clip_list(demo.first_second_stage).clips if c.id not in {s.id for s in source}]
    target += list(read_clip_list(demo.val).clips) + list(read_clip_list(demo.test).clips)
    for clip in [*source, *target]:
        assert sorted(clip.targets) == [0] * (demo.max_tags - 4) + [1, 1, 2, 2]
    source_vocabulary = {tag for clip in source for tag in clip.tags}
    target_vocabulary = {tag for clip in target for tag in clip.tags}
    assert source_vocabulary and target_vocabulary and not source_vocabulary & target_vocabulary
    for clip in read_clip_list(demo.pairs, with_pairs=True).clips:
        assert all(clip.targets[i] > clip.targets[j] for i, j in clip.pairs)


def test_same_parameters_reuse_the_files(demo):
    stamp = demo.features_h5.stat().st_mtime_ns
    assert ensure_ranking_demo(demo.root, seed=0, **SIZES) == demo
    assert demo.features_h5.stat().st_mtime_ns == stamp
    overrides = demo.config_overrides("reward")
    assert overrides["train_path"] == str(demo.pairs) and overrides["seq_length"] == demo.seq_length


def test_a_source_trained_scorer_transfers_only_partly(demo):
    """A bilinear probe (mean text token ⊗ mean frame, ridge regression on the targets) shows the promised
    structure: it ranks source clips almost perfectly; fitted on the source vocabulary it ranks target clips
    better than chance but clearly worse than the same probe fitted on target labels."""
    features = ClipFeatures(demo.features_h5)

    def rows(path):
        out = []
        for clip in read_clip_list(path).clips:
            text = features.text(clip.id, np.arange(len(clip.tags))).mean(axis=1)
            frames = features.frames(clip.id).mean(axis=0)
            out.append((np.einsum("ld,e->lde", text, frames).reshape(len(text), -1), np.array(clip.targets)))
        return out

    def fit(data):
        x = np.concatenate([x for x, _ in data])
        y = np.concatenate([y for _, y in data]).astype(np.float64)
        return np.linalg.solve(x.T @ x + np.eye(x.shape[1]), x.T @ y)

    def ndcg(scores_of, data):
        return mean_ndcg([clip_ndcg(scores_of(x), y) for x, y in data])["NDCG@all"]

    source, val, test = rows(demo.first_stage), rows(demo.val), rows(demo.test)
    from_source, from_target = fit(source), fit(val)
    chance = ndcg(lambda x: np.random.default_rng(0).random(len(x)), test)
    transfer = ndcg(lambda x: x @ from_source, test)
    adapted = ndcg(lambda x: x @ from_target, test)
    assert ndcg(lambda x: x @ from_source, source) > 0.95
    assert chance + 0.05 < transfer < adapted - 0.05, (chance, transfer, adapted)
