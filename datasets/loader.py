"""Batches of a caption dataset for training and validation, with DataLoader workers that pay off.

Order: training batches follow a seeded permutation per (seed, epoch), so resuming at an epoch boundary
replays the same order; validation batches follow the file. Under torchrun the batch sizes are global: the
global batches are the same on any number of processes and each rank loads its contiguous share of each
(`ShardedBatchSampler`); a validation split is cut into one contiguous part per rank.

Workers hand features over through a ring of shared-memory batch buffers. Torch would hand every worker batch
to the main process in freshly allocated shared memory; for real-size features (a batch of 32 segments is
about 8 MB) allocating and faulting in that memory takes several ms, more than reading the batch from a packed
feature file, so workers made the packed path slower. Instead, the main process allocates one buffer per batch
that can be in flight before the workers start. A worker pads its batch's features into the slot the batch
sampler assigned and sends only the small parts; the main process copies the features out of the slot before
it hands the batch on, so callers may keep batches as long as they like.

Pinned memory: only a run on a CUDA device asks for page-locked batches (`pin_memory`), which it then copies to
the device with `non_blocking`; on the CPU pinning would only cost an extra copy.

Errors: a worker returns the InputError or ToolError it hits instead of raising it, and the main process raises
it as is (`BatchReader`, `Batches`), so the user reads the same one line as without workers (torch would
re-raise it as a 30-line "Caught InputError in DataLoader worker process 0" message).

Why `prefetch_factor * num_workers + 1` slots suffice: the DataLoader keeps at most prefetch_factor ×
num_workers batches in flight and requests batch n + prefetch_factor × num_workers only when batch n arrives.
Batch k uses slot k mod S, so with S one more than that the slot of batch n is next written by batch n + S,
which is requested only when batch n + 1 arrives, after batch n was copied out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from datasets.captioning.activitynet import CaptionBatch, CaptionDataset, CollatedItems, assemble, pad_into
from utilities.distributed import share, world_size
from utilities.errors import InputError, ToolError
from utilities.seeding import Stream, data_generator, seed_worker, stream_seed

SHARED_MEMORY = "/dev/shm"
CARRIED_ERRORS = (InputError, ToolError)  # what main.py reports on one line: carried out of workers as values
T = TypeVar("T")


class SeededShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch that depends only on (seed, epoch): an exact resume at an epoch
    boundary sees the same order as the uninterrupted run. Call `set_epoch` before each epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = data_generator(stream_seed(Stream.SHUFFLE, self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=generator).tolist())


class Share(list):
    """One rank's sample indices of a global batch. `stand_in`: the share was empty (a last global batch shorter
    than the number of processes) and holds the batch's first sample instead, to be stepped on with zero weight
    (`utilities.distributed.stand_in`)."""

    def __init__(self, indices: Sequence[int], stand_in: bool = False):
        super().__init__(indices)
        self.stand_in = stand_in


class ShardedBatchSampler(Sampler[Share]):
    """This rank's share of each global batch; on one process, the global batches themselves."""

    def __init__(self, batches: BatchSampler):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Share]:
        for batch in self.batches:
            mine = share(batch)
            yield Share(mine) if mine else Share(batch[:1], stand_in=True)


class SlotBatch(list):
    """The sample indices of one batch and the ring slot its features go to (pickled along with the list)."""

    def __init__(self, indices: Sequence[int], slot: int):
        super().__init__(indices)
        self.slot = slot


class SlottedBatchSampler(Sampler[SlotBatch]):
    """Batch k of an epoch goes to slot k mod n_slots."""

    def __init__(self, batches: BatchSampler, n_slots: int):
        self.batches, self.n_slots = batches, n_slots

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[SlotBatch]:
        for k, indices in enumerate(self.batches):
            yield SlotBatch(indices, k % self.n_slots)


def ring_bytes(n_slots: int, batch_size: int, rows: dict[str, int], dims: dict[str, int]) -> int:
    """The shared memory a `SharedBatchRing` of this shape holds."""
    return 4 * n_slots * batch_size * sum(rows[m] * dims[m] for m in rows)


def check_shared_memory(needs: dict[str, int]) -> None:
    """Fail before allocating when the rings a process will hold together (`needs`: bytes per loader) exceed
    the free space of /dev/shm: past it, a worker's write into the ring kills the process with SIGBUS."""
    need = sum(needs.values())
    if not need or not os.path.isdir(SHARED_MEMORY):
        return
    stat = os.statvfs(SHARED_MEMORY)
    free = stat.f_bavail * stat.f_frsize
    if need > free:
        parts = ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in needs.items())
        raise InputError(
            f"DataLoader workers need {need / 2**20:.0f} MiB of shared memory for their batch rings ({parts}), "
            f"but {SHARED_MEMORY} has {free / 2**20:.0f} MiB free: lower --B or --num_workers, use "
            "--num_workers 0, or give the container more (docker run --shm-size)"
        )


class SharedBatchRing:
    """Per modality a (n_slots, batch_size, max rows, dim) float32 buffer in shared memory."""

    def __init__(self, n_slots: int, batch_size: int, rows: dict[str, int], dims: dict[str, int]):
        check_shared_memory({"this loader": ring_bytes(n_slots, batch_size, rows, dims)})
        self.buffers = {m: torch.zeros(n_slots, batch_size, rows[m], dims[m]).share_memory_() for m in rows}

    def write(self, slot: int, features: dict[str, list[np.ndarray]]) -> None:
        """In a worker: pad each modality's crops into the slot."""
        for m, arrays in features.items():
            pad_into(arrays, self.buffers[m][slot, : len(arrays), : max(map(len, arrays))].numpy())

    def read(self, collated: CollatedItems, pin: bool) -> dict[str, torch.Tensor]:
        """In the main process: copies of the slot's padded features (pinned for a fast GPU transfer)."""
        features = {}
        for m, lengths in collated.feature_lengths.items():
            view = self.buffers[m][collated.slot, : len(lengths), : int(lengths.max())]
            features[m] = torch.empty(view.shape, pin_memory=pin)
            np.copyto(features[m].numpy(), view.numpy())  # one thread: the workers have the other cores
        return features


class BatchReader(Dataset):
    """A dataset as DataLoader workers see it: a whole batch per call (`read`), collated in the worker. An
    InputError or ToolError is returned instead of raised; `Batches` raises it in the main process. Give
    the DataLoader `collate_fn=as_collated`."""

    def __init__(self, dataset: Dataset, collate: Callable[[list], Any]):
        self.dataset, self.collate = dataset, collate

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, indices: Sequence[int]) -> Any:
        return self.collate([self.dataset[i] for i in indices])

    def __getitems__(self, indices: Sequence[int]) -> Any:
        try:
            return self.read(indices)
        except CARRIED_ERRORS as error:
            return error


def as_collated(batch: T) -> T:
    """The DataLoader `collate_fn` of a `BatchReader`: its batches are collated already."""
    return batch


class Batches(Generic[T]):
    """The batches of a DataLoader over a `BatchReader`, with its length; an error a worker returned is raised
    here, in the main process."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[T]:
        for batch in self.loader:
            if isinstance(batch, CARRIED_ERRORS):
                raise batch
            yield batch


class _RingReader(BatchReader):
    """The caption dataset as workers see it: a batch's features are written into the ring, the rest collated."""

    def __init__(self, dataset: CaptionDataset, ring: SharedBatchRing):
        super().__init__(dataset, dataset.collate_items)
        self.ring = ring

    def read(self, request: SlotBatch) -> CollatedItems:
        items = [self.dataset[i] for i in request]
        self.ring.write(request.slot, {m: [it.features[m] for it in items] for m in self.dataset.stores})
        collated = self.collate(items)
        collated.slot = request.slot
        return collated


class CaptionLoader:
    """Batches of a `CaptionDataset` (`loader.sampler.set_epoch(e)` before each training epoch). `batch_size` is
    global: under torchrun a training loader yields this rank's share of each global batch (a `CaptionBatch`
    with `stand_in` set where the share was empty), a validation loader the batches of this rank's part of the
    split, `batch_size / world size` segments each."""

    def __init__(
        self,
        dataset: CaptionDataset,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        max_rows: dict[str, int] | None = None,
        pin_memory: bool = False,
    ):
        """`max_rows`: the dataset's `max_crop_rows()` where the caller has computed it already; `pin_memory`:
        batches in page-locked memory (for a run on a CUDA device)."""
        self.dataset = dataset
        local_size = -(-batch_size // world_size())
        if shuffle:
            self.sampler = SeededShuffleSampler(len(dataset), seed)
            batches = ShardedBatchSampler(BatchSampler(self.sampler, batch_size, drop_last=False))
        else:
            self.sampler = share(range(len(dataset)))
            batches = BatchSampler(self.sampler, local_size, drop_last=False)
        self.batches = batches
        self.pin = pin_memory
        self.ring = None
        # Every DataLoader iterator draws a base seed for its workers from `generator` (from torch's global RNG
        # without one), workers or not: its own generator keeps dropout's stream the same whatever --num_workers.
        generator = data_generator(stream_seed(Stream.LOADER, seed))
        if num_workers == 0:
            self.loader = DataLoader(
                dataset,
                batch_sampler=batches,
                collate_fn=dataset.collate,
                pin_memory=self.pin,
                generator=generator,
            )
            return
        n_slots = ring_slots(num_workers, prefetch_factor)
        dims = {m: store.dim for m, store in dataset.stores.items()}
        self.ring = SharedBatchRing(n_slots, local_size, max_rows or dataset.max_crop_rows(), dims)
        self.loader = DataLoader(
            _RingReader(dataset, self.ring),
            batch_sampler=SlottedBatchSampler(batches, n_slots),
            collate_fn=as_collated,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor,
            worker_init_fn=seed_worker,
            generator=generator,
            persistent_workers=True,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[CaptionBatch]:
        stand_ins = [getattr(b, "stand_in", False) for b in self.batches]  # the order is fixed per epoch
        for batch, stand_in in zip(self._batches(), stand_ins, strict=True):
            batch.stand_in = stand_in
            yield batch

    def _batches(self) -> Iterator[CaptionBatch]:
        if self.ring is None:
            yield from self.loader
            return
        for collated in Batches(self.loader):
            batch = assemble(self.ring.read(collated, self.pin), collated, self.dataset.vocab.pad_idx)
            yield batch.pin_memory() if self.pin else batch


_END = object()


def prefetched(batches: Iterable[T], pin: bool) -> Iterator[T]:
    """`batches` (with `pin_memory()`) in order, each next one read in a background thread, and pinned when
    `pin` (only for a CUDA device), while the caller works on the current one: a loop that reads its features
    from HDF5 between GPU steps overlaps the read with the step. Only the thread advances `batches`; an error
    it hits is raised here, at the batch it belongs to."""

    def read(source: Iterator[T]) -> Any:
        batch = next(source, _END)
        return batch.pin_memory() if pin and batch is not _END else batch

    with ThreadPoolExecutor(max_workers=1) as pool:
        source = iter(batches)
        pending = pool.submit(read, source)
        while (batch := pending.result()) is not _END:
            pending = pool.submit(read, source)
            yield batch


def ring_slots(num_workers: int, prefetch_factor: int = 2) -> int:
    """One ring slot per batch that can be in flight, plus one (see the module docstring)."""
    return prefetch_factor * num_workers + 1


def on_cuda(cfg) -> bool:
    """Whether the run's (resolved) `--device` is a CUDA device: its loaders pin their batches."""
    return torch.device(cfg.device).type == "cuda"


def train_loader(cfg, dataset: CaptionDataset, max_rows: dict[str, int] | None = None) -> CaptionLoader:
    """`--B` segments per batch in a seeded order per epoch."""
    return CaptionLoader(
        dataset,
        cfg.B,
        shuffle=True,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        max_rows=max_rows,
        pin_memory=on_cuda(cfg),
    )


def val_loader(cfg, dataset: CaptionDataset, max_rows: dict[str, int] | None = None) -> CaptionLoader:
    """`--inf_B_coeff` × `--B` segments per batch in file order."""
    return CaptionLoader(
        dataset,
        cfg.inf_B_coeff * cfg.B,
        shuffle=False,
        num_workers=cfg.num_workers,
        max_rows=max_rows,
        pin_memory=on_cuda(cfg),
    )


def caption_loaders(
    cfg, train: CaptionDataset | None, val: dict[str, CaptionDataset]
) -> tuple[CaptionLoader | None, dict[str, CaptionLoader]]:
    """The training loader and one validation loader per split, for a run that holds them all at once:
    their shared-memory rings are checked together, before any is allocated."""
    planned = {"train": (train, cfg.B)} if train is not None else {}
    planned.update(
        {f"validation {name}": (dataset, cfg.inf_B_coeff * cfg.B) for name, dataset in val.items()}
    )
    max_rows = {}
    if cfg.num_workers:
        needs = {}
        for label, (dataset, batch_size) in planned.items():
            max_rows[label] = dataset.max_crop_rows()
            dims = {m: store.dim for m, store in dataset.stores.items()}
            needs[label] = ring_bytes(ring_slots(cfg.num_workers), batch_size, max_rows[label], dims)
        check_shared_memory(needs)
    train_batches = None if train is None else train_loader(cfg, train, max_rows.get("train"))
    return train_batches, {
        name: val_loader(cfg, dataset, max_rows.get(f"validation {name}")) for name, dataset in val.items()
    }
