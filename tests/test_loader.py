"""Caption loaders: worker batches equal in-process batches, survive the shared-memory ring, and fail clearly."""

from __future__ import annotations

import os

import pytest
import torch

import datasets.loader as loader_module
from datasets.captioning.activitynet import build_caption_dataset, read_captions_csv
from datasets.demo import ensure_demo_dataset
from datasets.features import pack_directory
from datasets.loader import CaptionLoader, caption_loaders, ring_bytes, ring_slots, train_loader, val_loader
from datasets.vocabulary import build_vocabulary
from main import build_parser
from utilities.config import Config, config_from_argv
from utilities.errors import InputError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The demo train split (the real on-disk formats), read through packed HDF5 files."""
    root = tmp_path_factory.mktemp("loader")
    demo = ensure_demo_dataset(root / "demo", seed=0, n_train=40, n_val=10)
    pack_directory(demo.video_features_path, "video", root / "video.h5", 1024)
    pack_directory(demo.audio_features_path, "audio", root / "audio.h5", 128)
    flags = ["--video_features_path", str(root / "video.h5"), "--audio_features_path", str(root / "audio.h5")]
    cfg = config_from_argv(build_parser(), ["--procedure", "demo", *flags])
    vocab = build_vocabulary([s.caption for s in read_captions_csv(demo.train_meta_path).segments])
    return build_caption_dataset(cfg, demo.train_meta_path, vocab)


def epoch(loader: CaptionLoader, e: int, n_batches: int | None = None) -> list:
    loader.sampler.set_epoch(e)
    return [batch for _, batch in zip(range(n_batches or len(loader)), loader, strict=False)]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.indices == y.indices and x.starts == y.starts
        for name in ("video", "video_mask", "audio", "audio_mask", "captions", "caption_mask"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_worker_batches_equal_in_process_batches_and_are_never_overwritten(dataset):
    serial = CaptionLoader(dataset, 8, shuffle=True, seed=1)
    parallel = CaptionLoader(dataset, 8, shuffle=True, seed=1, num_workers=2)
    assert len(parallel.ring.buffers["video"]) == 5  # 2 × 2 in flight + 1
    assert len(parallel) > 2 * 5  # every slot is reused while all batches are kept
    kept = epoch(parallel, 0)
    assert_same_batches(epoch(serial, 0), kept)
    for batch in kept:  # a reused slot's old rows never leak into the padding
        assert batch.video[~batch.video_mask].eq(0).all() and batch.audio[~batch.audio_mask].eq(0).all()
    # An epoch left early, then the next one: the persistent workers' late batches do not disturb it.
    epoch(parallel, 1, n_batches=3)
    assert_same_batches(epoch(serial, 2), epoch(parallel, 2))
    validation = CaptionLoader(dataset, 16, shuffle=False, num_workers=2)
    assert [i for batch in validation for i in batch.indices] == [s.idx for s in dataset.segments]


def test_ring_slots_hold_the_longest_crop(dataset):
    rows = dataset.max_crop_rows()
    items = [dataset[i] for i in range(len(dataset))]
    assert rows == {m: max(len(it.features[m]) for it in items) for m in ("video", "audio")}


def test_too_little_shared_memory_is_a_clear_error(dataset, monkeypatch):
    if not os.path.isdir(loader_module.SHARED_MEMORY):
        pytest.skip("no /dev/shm on this system")
    real_statvfs = os.statvfs

    class Tiny:
        f_bavail, f_frsize = 1, 4096

    monkeypatch.setattr(loader_module.os, "statvfs", lambda p: Tiny() if p == "/dev/shm" else real_statvfs(p))
    with pytest.raises(InputError, match=r"need \d+ MiB of shared memory .* /dev/shm has 0 MiB free"):
        CaptionLoader(dataset, 8, shuffle=True, num_workers=2)
    assert CaptionLoader(dataset, 8, shuffle=True).ring is None  # without workers no shared memory is needed


def test_shared_memory_check_covers_every_ring_the_run_holds(dataset, monkeypatch):
    """Room for one and a half rings: each loader alone fits, training + validation together do not."""
    if not os.path.isdir(loader_module.SHARED_MEMORY):
        pytest.skip("no /dev/shm on this system")
    cfg = Config(B=8, inf_B_coeff=1, num_workers=2, seed=0, device="cpu")
    one_ring = ring_bytes(ring_slots(2), 8, dataset.max_crop_rows(), {"video": 1024, "audio": 128})
    real_statvfs = os.statvfs

    class RingAndAHalf:
        f_frsize = 4096
        f_bavail = one_ring * 3 // 2 // 4096

    monkeypatch.setattr(
        loader_module.os, "statvfs", lambda p: RingAndAHalf() if p == "/dev/shm" else real_statvfs(p)
    )
    assert train_loader(cfg, dataset).ring is not None and val_loader(cfg, dataset).ring is not None
    with pytest.raises(
        InputError, match=r"for their batch rings \(train \d+ MiB, validation val_1 \d+ MiB\)"
    ):
        caption_loaders(cfg, dataset, {"val_1": dataset})
    train, val = caption_loaders(cfg, None, {"val_1": dataset})
    assert train is None and list(val) == ["val_1"]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_pinned_only_for_a_cuda_run(dataset, workers):
    """Pinned (page-locked) memory is asked for iff the run's device is CUDA; a CPU run's batches are the same
    either way (the loader built as before this choice, when it never pinned on a machine without CUDA)."""
    for device, pinned in (("cpu", False), ("cuda", True), ("cuda:1", True)):
        cfg = Config(B=8, inf_B_coeff=1, num_workers=workers, seed=0, device=device)
        for loader in (train_loader(cfg, dataset), val_loader(cfg, dataset)):
            assert loader.pin is pinned
            assert loader.loader.pin_memory is (pinned and workers == 0)  # with workers the ring copy pins
    cpu = train_loader(Config(B=8, inf_B_coeff=1, num_workers=workers, seed=0, device="cpu"), dataset)
    reference = CaptionLoader(dataset, 8, shuffle=True, seed=0, num_workers=workers)
    assert_same_batches(epoch(cpu, 1, 2), epoch(reference, 1, 2))
