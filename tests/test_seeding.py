"""One seed gives the same numbers from python, numpy, torch and DataLoader order."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader

from utilities.seeding import data_generator, rng_states, seed_everything, seed_worker, set_rng_states


def draw(seed: int) -> tuple:
    seed_everything(seed)
    loader = DataLoader(list(range(20)), batch_size=5, shuffle=True, generator=data_generator(seed))
    order = [batch.tolist() for batch in loader]
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), order


def test_same_seed_same_draws_different_seed_different_draws():
    assert draw(7) == draw(7)
    assert all(a != b for a, b in zip(draw(7), draw(8), strict=True))


def test_worker_data_order_is_seeded():
    def order(seed):
        loader = DataLoader(
            list(range(12)),
            batch_size=4,
            shuffle=True,
            num_workers=2,
            generator=data_generator(seed),
            worker_init_fn=seed_worker,
        )
        return [batch.tolist() for batch in loader]

    assert order(3) == order(3)


def test_rng_states_round_trip():
    seed_everything(1)
    random.gauss(0, 1)  # leaves a cached gauss value in python's state
    saved = rng_states()
    expected = (random.gauss(0, 1), float(np.random.randn()), torch.rand(2).tolist())
    seed_everything(2)
    set_rng_states(saved)
    assert (random.gauss(0, 1), float(np.random.randn()), torch.rand(2).tolist()) == expected
