"""One seed gives the same numbers from python, numpy, torch and DataLoader order."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets.vocabulary import Vocabulary
from epoch_loops.captioning.agent_files import build_agents
from model.captioning.bmhrl import AgentConfig
from utilities.seeding import (
    RowStreams,
    Stream,
    data_generator,
    normal,
    rng_states,
    seed_everything,
    seed_worker,
    set_rng_states,
    stream_seed,
    uniform,
)


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


def test_the_streams_of_batch_0_never_draw_the_same_numbers():
    """Each purpose has its own stream: the epoch-0 shuffle, the loader seeds, item 0's draws, the PPO sampling
    of batch 0 and the minibatch order of update 0 (the old keys (seed, epoch) and (seed, epoch, 0) of the
    shuffle and the sampling of batch 0 gave one and the same generator)."""
    for seed in (0, 1, 42):
        seeds = {
            Stream.SHUFFLE: stream_seed(Stream.SHUFFLE, seed, 0),
            Stream.LOADER: stream_seed(Stream.LOADER, seed, 0),
            Stream.ITEM: stream_seed(Stream.ITEM, seed, 0, 0),
            Stream.ROLLOUT: stream_seed(Stream.ROLLOUT, seed, 0, 0),
            Stream.MINIBATCH: stream_seed(Stream.MINIBATCH, seed, 0, 0),
            Stream.AGENT: stream_seed(Stream.AGENT, seed),
            Stream.SAMPLE: stream_seed(Stream.SAMPLE, seed, 0, 0, 0),
        }
        assert set(seeds) == set(Stream)
        draws = {tuple(torch.rand(4, generator=data_generator(s)).tolist()) for s in seeds.values()}
        torch.manual_seed(seed)  # the global RNG (dropout) is another stream still
        draws.add(tuple(torch.rand(4).tolist()))
        assert len(draws) == len(seeds) + 1
    assert stream_seed(Stream.ROLLOUT, 3, 1) != stream_seed(
        Stream.ROLLOUT, 3, 1, 0
    )  # SeedSequence pads zeros
    assert 0 <= stream_seed(Stream.SHUFFLE, -1, 2**70) < 2**63


def test_the_agent_samples_from_its_own_stream_not_the_global_one():
    vocab = Vocabulary(["<unk>", "<blank>", "<s>", "</s>", "a"])
    agent = build_agents(AgentConfig(), vocab, seed=5).agent
    torch.manual_seed(5)
    assert not torch.equal(torch.rand(4, generator=agent.rng), torch.rand(4))


def test_row_streams_draw_per_row_whatever_the_batch_around_it():
    """A row's numbers depend on its own seed only: the same row draws the same in any batch, at any position."""
    seeds = [stream_seed(Stream.SAMPLE, 0, 5, i, 0) for i in range(4)]
    whole = uniform((4, 3), RowStreams(seeds))
    part = uniform((2, 3), RowStreams(seeds[2:]))
    assert torch.equal(whole[2:], part)
    assert torch.equal(whole[0], torch.rand(3, generator=torch.Generator().manual_seed(seeds[0])))
    streams = RowStreams(seeds[:1])
    first, second = uniform((1, 2), streams), normal((1, 2), streams)  # one stream, consumed in call order
    g = torch.Generator().manual_seed(seeds[0])
    assert torch.equal(first[0], torch.rand(2, generator=g)) and torch.equal(
        second[0], torch.randn(2, generator=g)
    )
    with pytest.raises(ValueError, match="3 rows drawn from 1 row streams"):
        uniform((3,), streams)
