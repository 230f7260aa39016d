"""LRMovieNet readers and samples (datasets/ranking/lrmovienet.py): validation errors, frame slots, the stages' samples."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets.ranking.lrmovienet import (
    STORED_ORDER,
    ClipDataset,
    ClipFeatures,
    PPOPairDataset,
    RewardPairDataset,
    RewardTripletDataset,
    collate_labels,
    frame_slots,
    pointwise_labels,
    read_clip_list,
)
from utilities.errors import InputError

S, D = 3, 4  # text tokens, feature width


def clip(clip_id, targets, index=None):
    entry = {"id": clip_id, "tags": [{"tag": f"{clip_id}-t{k}", "target": t} for k, t in enumerate(targets)]}
    if index is not None:
        entry["index"] = index
    return entry


def write(tmp_path, clips, n_frames=None, name="clips.json"):
    """The clip list JSON and an HDF5 whose rows encode where they come from: text[l, s, :] = 100·l + s,
    frame f = 1000 + f, offset by 10000·clip number."""
    path = tmp_path / name
    path.write_text(json.dumps(clips))
    h5 = tmp_path / "feat.h5"
    with h5py.File(h5, "a") as f:
        for n, c in enumerate(clips):
            if str(c["id"]) in f:
                continue
            t, frames = len(c["tags"]), (n_frames or {}).get(str(c["id"]), 3)
            text = 10000 * n + 100 * np.arange(t)[:, None, None] + np.arange(S)[None, :, None]
            g = f.create_group(str(c["id"]))
            g["text_emb"] = np.broadcast_to(text, (t, S, D)).astype(np.float32)
            g["img_emb"] = np.broadcast_to(
                10000 * n + 1000 + np.arange(frames)[:, None], (1, frames, D)
            ).astype(np.float32)
    return path, h5


# --- clip lists -----------------------------------------------------------------------------------------------


def test_clip_list_reads_ids_as_strings_and_int_like_targets(tmp_path):
    path, _ = write(tmp_path, [clip(17, [0, "2", 1.0]), clip("b", [1], index=[])])
    clips = read_clip_list(path)
    assert [c.id for c in clips.clips] == ["17", "b"]
    assert clips.clips[0].targets == (0, 2, 1)
    assert clips.clips[0].tags == ("17-t0", "17-t1", "17-t2")


@pytest.mark.parametrize(
    ("clips", "with_pairs", "message"),
    [
        ([], False, "non-empty JSON list"),
        ([clip("a", [])], False, "clip a (entry 0): empty or missing candidate list"),
        (
            [clip("a", [0, "high"])],
            False,
            "clip a (entry 0): tags[1] (a-t1): target 'high' is not an integer",
        ),
        ([clip("a", [1.5])], False, "target 1.5 is not an integer"),
        ([clip("a", [-1])], False, "target -1 is negative"),
        ([clip("a", [1]), clip("a", [2])], False, "clip a (entry 1) is listed twice"),
        ([clip("a", [1, 0])], True, "clip a (entry 0): the pair file needs `index`"),
        ([clip("a", [1, 0], index=[[0, 2]])], True, "index[0] = [0, 2] is out of range for its 2 labels"),
        ([clip("a", [1, 0], index=[[-1, 0]])], True, "out of range"),
        ([clip("a", [1, 0], index=[[1, 1]])], True, "compares a label with itself"),
        ([clip("a", [1, 0], index=[[0]])], True, "is not a pair"),
        ([clip("a", [1, 0], index=[])], True, "no clip has a preference pair"),
    ],
)
def test_clip_list_errors_name_file_and_clip(tmp_path, clips, with_pairs, message):
    path = tmp_path / "clips.json"
    path.write_text(json.dumps(clips))
    with pytest.raises(InputError) as error:
        read_clip_list(path, with_pairs=with_pairs)
    assert message in str(error.value)
    assert str(path) in str(error.value)


# --- feature file ---------------------------------------------------------------------------------------------


def test_feature_check_errors_name_file_and_clip(tmp_path):
    path, h5 = write(tmp_path, [clip("a", [1, 0]), clip("b", [2, 1, 0])])
    clips = read_clip_list(path)
    with h5py.File(h5, "a") as f:
        del f["b/text_emb"]
        f["b/text_emb"] = np.zeros((2, S, D), np.float32)  # 3 labels, 2 rows
    with pytest.raises(
        InputError, match=r"feat.h5: clip b \(from .*clips.json\): 3 labels in the clip list but 2 rows"
    ):
        ClipFeatures(h5).check(clips)
    with h5py.File(h5, "a") as f:
        del f["b/text_emb"]
        f["b/text_emb"] = np.zeros((4, S, D), np.float32)  # 3 labels, 4 rows: not cut silently
    with pytest.raises(
        InputError, match=r"clip b \(from .*clips.json\): 3 labels in the clip list but 4 rows in text_emb"
    ):
        ClipFeatures(h5).check(clips)
    with h5py.File(h5, "a") as f:
        del f["b"]
    with pytest.raises(InputError, match=r"clip b .*no such group"):
        ClipFeatures(h5).check(clips)
    with pytest.raises(InputError, match=r"rows are \[3, 4\], expected \[seq_length 196, dim 4\]"):
        ClipFeatures(h5, seq_length=196).check(
            read_clip_list(write(tmp_path, [clip("a", [1, 0])], name="a.json")[0])
        )
    with pytest.raises(InputError, match="feature HDF5 not found"):
        ClipFeatures(tmp_path / "missing.h5")


def test_bad_img_emb_and_non_finite_rows_are_reported(tmp_path):
    path, h5 = write(tmp_path, [clip("a", [1, 0])])
    with h5py.File(h5, "a") as f:
        f["a/text_emb"][1, 0, 0] = np.nan
    features = ClipFeatures(h5)
    features.check(read_clip_list(path))
    features.text("a", np.array([0]))
    with pytest.raises(InputError, match="clip a text_emb: holds NaN"):
        features.text("a", np.array([1]))
    features.close()
    with h5py.File(h5, "a") as f:
        del f["a/img_emb"]
        f["a/img_emb"] = np.zeros((3, D), np.float32)
    with pytest.raises(InputError, match=r"clip a .*expected \[T, S, D\] / \[1, F ≥ 1, D\]"):
        ClipFeatures(h5).check(read_clip_list(path))


# --- frames and label lists -----------------------------------------------------------------------------------


def test_frame_slots_cycle_in_stored_order():
    assert frame_slots(3, 8).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert frame_slots(20, 16).tolist() == list(range(16))
    assert frame_slots(1, 3).tolist() == [0, 0, 0]


def test_frame_slots_random_order_is_a_seeded_permutation_then_cycled():
    slots = frame_slots(5, 12, frame_key=123)
    assert sorted(slots[:5].tolist()) == list(range(5))
    assert slots.tolist() == [slots[k % 5] for k in range(12)]
    assert slots.tolist() == frame_slots(5, 12, frame_key=123).tolist()
    assert len({tuple(frame_slots(5, 5, frame_key=k)) for k in range(20)}) > 1


def test_pointwise_labels_as_the_original():
    assert pointwise_labels([0, 2, 0, 1, 1], 8).tolist() == [
        0,
        1,
        2,
        3,
        4,
        4,
        1,
        3,
    ]  # relevant 1,3,4 from 5 % 3
    assert pointwise_labels([0, 0, 0], 5).tolist() == [0, 1, 2, 0, 1]  # none relevant: cycle all, from 3 % 3
    assert pointwise_labels([1, 0, 2, 1], 3).tolist() == [0, 1, 2]


# --- datasets -------------------------------------------------------------------------------------------------


@pytest.fixture
def data(tmp_path):
    clips = [
        clip("a", [0, 1, 2, 0], index=[[2, 0], [1, 3]]),
        clip("b", [2, 0, 1], index=[[0, 1]]),
        clip("c", [1, 0], index=[]),
    ]
    path, h5 = write(tmp_path, clips, n_frames={"a": 3, "b": 6, "c": 1})
    return read_clip_list(path, with_pairs=True), ClipFeatures(h5)


def test_evaluation_items_hold_all_labels_and_stored_frames_once(data):
    clips, features = data
    dataset = ClipDataset(clips, features, max_imgs=4)
    item = dataset[0]
    assert item.labels.tolist() == [0, 1, 2, 3]
    assert item.text.shape == (4, S, D) and item.frames.shape == (4, D)
    assert item.text[:, :, 0].tolist() == [[100 * label + s for s in range(S)] for label in range(4)]
    assert item.frames[:, 0].tolist() == [1000, 1001, 1002, 1000]  # 3 frames cycled into 4 slots
    assert item.targets.tolist() == [0, 1, 2, 0] and item.frame_key == STORED_ORDER
    dataset.set_epoch(5)
    assert np.array_equal(dataset[1].frames, ClipDataset(clips, features, max_imgs=4)[1].frames)


def test_pointwise_training_items_are_seeded_per_epoch(data):
    clips, features = data
    dataset = ClipDataset(clips, features, max_imgs=6, max_tags=5, frame_order="random", seed=3)
    item = dataset[0]
    assert item.labels.tolist() == pointwise_labels([0, 1, 2, 0], 5).tolist()
    assert sorted(item.frames[:3, 0] - 1000) == [0, 1, 2]
    same = ClipDataset(clips, features, max_imgs=6, max_tags=5, frame_order="random", seed=3)[0]
    assert np.array_equal(item.frames, same.frames) and item.frame_key == same.frame_key
    keys = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        keys.add(dataset[1].frame_key)
    assert len(keys) == 6


def test_reward_pairs_put_the_preferred_label_first_in_the_chosen_ranking(data):
    clips, features = data
    dataset = RewardPairDataset(clips, features, max_imgs=2, seed=0)
    assert len(dataset) == 3
    contexts = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        for index, (clip_id, (i, j)) in enumerate(dataset.items):
            item = dataset[index]
            assert item.clip_id == clip_id and item.labels.tolist() == [i, j]
            chosen, rejected = item.labels[item.chosen], item.labels[item.rejected]
            assert chosen[2:].tolist() == [i, j] and rejected[2:].tolist() == [j, i]
            assert chosen[:2].tolist() == rejected[:2].tolist() and sorted(chosen[:2]) == sorted([i, j])
            contexts.add(tuple(item.chosen[:2]))
    assert contexts == {(0, 1), (1, 0)}


def test_reward_validation_triplets(data):
    clips, features = data
    dataset = RewardTripletDataset(clips, features, max_imgs=2, seed=1, per_clip=10)
    assert len(dataset) == 20  # clip c lacks level 2
    for index in range(len(dataset)):
        item = dataset[index]
        assert sorted(item.targets.tolist()) == [0, 1, 2]
        hi, lo = item.targets[item.chosen[2]], item.targets[item.chosen[3]]
        assert hi > lo and item.chosen[:2].tolist() == item.rejected[:2].tolist()
        assert item.rejected[2:].tolist() == item.chosen[2:][::-1].tolist()
    dataset.set_epoch(3)
    again = RewardTripletDataset(clips, features, max_imgs=2, seed=1, per_clip=10)
    assert all(np.array_equal(dataset[i].chosen, again[i].chosen) for i in range(20))


def test_ppo_pairs_and_refetching_from_a_rollout_buffer(data):
    clips, features = data
    dataset = PPOPairDataset(clips, features, max_imgs=4, pairs_per_clip=5, frame_order="random", seed=2)
    assert len(dataset) == 15
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_labels)
    batches = list(loader)
    for batch in batches:
        assert batch.labels.shape[1] == 2 and bool(batch.mask.all())
        assert bool((batch.labels[:, 0] != batch.labels[:, 1]).all())
        # the buffer keeps ids, label positions and frame keys only; re-reading gives the same tensors
        again = dataset.fetch(batch.clip_ids, batch.labels.tolist(), batch.frame_keys.tolist())
        assert torch.equal(again.text, batch.text) and torch.equal(again.frames, batch.frames)
        assert torch.equal(again.targets, batch.targets)


def test_ppo_needs_two_labels_per_clip(tmp_path):
    path, h5 = write(tmp_path, [clip("a", [1, 0]), clip("z", [1])])
    with pytest.raises(InputError, match="clip z has 1 label"):
        PPOPairDataset(read_clip_list(path), ClipFeatures(h5), max_imgs=2, pairs_per_clip=3)


def test_collate_pads_labels_with_a_mask(data):
    clips, features = data
    batch = collate_labels([ClipDataset(clips, features, max_imgs=2)[i] for i in (0, 2)])
    assert batch.text.shape == (2, 4, S, D) and batch.frames.shape == (2, 2, D)
    assert batch.mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert batch.text[1, 2:].abs().sum() == 0 and batch.chosen is None


def test_workers_open_their_own_handle_and_give_the_same_batches(data):
    clips, features = data
    dataset = PPOPairDataset(clips, features, max_imgs=4, pairs_per_clip=4, frame_order="random", seed=9)
    dataset.fetch(["a"], [[0, 1]])  # the main process holds an open handle when the workers fork
    serial = list(DataLoader(dataset, batch_size=3, collate_fn=collate_labels))
    parallel = list(DataLoader(dataset, batch_size=3, collate_fn=collate_labels, num_workers=2))
    assert len(serial) == len(parallel)
    for x, y in zip(serial, parallel, strict=True):
        assert x.clip_ids == y.clip_ids and torch.equal(x.text, y.text) and torch.equal(x.frames, y.frames)
