"""One seed for python, numpy, torch and the data order: the same seed gives the same result on CPU.

torch is imported inside the functions that use it, so that procedures that never use torch (`eval`) do not
spend a second importing it.
"""

from __future__ import annotations

import enum
import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def seed_everything(seed: int, with_torch: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if with_torch:
        import torch

        torch.manual_seed(seed)


class Stream(enum.IntEnum):
    """What a random stream is for: the first key of its seed (`stream_seed`), so that two purposes never share
    a stream, whatever their other keys are."""

    SHUFFLE = 1  # the data order of a training epoch
    LOADER = 2  # a DataLoader's base seed (its workers' seeds)
    ITEM = 3  # a dataset item's own draws (frame order, sampled labels)
    ROLLOUT = 4  # PPO's ranking samples of one rollout batch
    MINIBATCH = 5  # PPO's minibatch order within one update
    AGENT = 6  # the BMHRL agent's exploration and sampling generator
    SAMPLE = 7  # one sample's draws in one optimiser step (`RowStreams`): RL captions, explored goals


def stream_seed(stream: Stream, *keys: int) -> int:
    """A 63-bit seed for one random stream, from its purpose and its keys (seed, epoch, batch, ...). The number
    of keys is part of the entropy: numpy's SeedSequence alone mixes [s, e] and [s, e, 0] to the same state."""
    entropy = [int(stream), len(keys), *(k % 2**63 for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> 1)


def data_generator(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded with `seed` (a `stream_seed`): data order and loader seeds draw from their
    own generators, never from the global RNG that dropout draws from."""
    import torch

    return torch.Generator().manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: derive numpy/python seeds from torch's per-worker seed."""
    import torch

    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def rng_states() -> dict:
    """Every global RNG state, as tensors and plain containers (loadable with weights_only=True)."""
    import torch

    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    import torch

    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    numpy = states["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached"],
        )
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RowStreams:
    """One CPU generator per row of a batch, each seeded from what identifies that row's draws (seed, optimiser
    step, global sample index, ...), never from which process holds the row: the same rows draw the same numbers
    on 1 or N processes and in any batch composition. Each row consumes its own stream in call order; a draw with
    positions (rows, T, ...) takes them position by position, so a row's numbers at position t do not depend on
    how far its batch is padded (draw only once per stream from such a shape: a later call would start after
    the padding)."""

    def __init__(self, seeds: list[int]):
        import torch

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def draw(self, fill, shape: tuple[int, ...]) -> torch.Tensor:
        """`fill(shape, generator=g)` (torch.rand, torch.randn) for every row, stacked: `shape[0]` rows."""
        import torch

        if shape[0] != len(self.generators):
            raise ValueError(f"{shape[0]} rows drawn from {len(self.generators)} row streams")
        if len(shape) < 3:
            return torch.stack([fill(shape[1:], generator=g) for g in self.generators])
        return torch.stack(
            [torch.stack([fill(shape[2:], generator=g) for _ in range(shape[1])]) for g in self.generators]
        )


def uniform(shape: tuple[int, ...], rng: torch.Generator | RowStreams) -> torch.Tensor:
    """U[0, 1) numbers of `shape` on the CPU, from one generator or one stream per row (`RowStreams`)."""
    import torch

    return rng.draw(torch.rand, shape) if isinstance(rng, RowStreams) else torch.rand(shape, generator=rng)


def normal(shape: tuple[int, ...], rng: torch.Generator | RowStreams) -> torch.Tensor:
    """N(0, 1) numbers of `shape` on the CPU, from one generator or one stream per row (`RowStreams`)."""
    import torch

    return rng.draw(torch.randn, shape) if isinstance(rng, RowStreams) else torch.randn(shape, generator=rng)
