"""Speed of the BMHRL agent at the paper's sizes (|V| = 10172), one JSON object per line:

- {"what": "greedy", "cache": true|false, "captions_per_s": ...}: B = 32 segments (20 video rows, 50 audio rows),
  30 generated tokens each (the end token is suppressed so every caption has 30), cached vs the original's
  full-prefix recomputation; then {"what": "greedy_outputs_identical", "value": true|false}.
- {"what": "warm_start_step", "B": 16, "seconds": ...}: forward, label-smoothing loss, backward and Adam step with
  17-token captions (median of a few steps after a warm-up).
- {"what": "rl_step", "objective": "scst"|"biased_kl", "B": 16, "seconds": ..., "reward_share": ...}: one RL step
  of the worker (scst: K = 5 samples of up to 30 tokens per segment and the greedy baseline; biased_kl: 17-token
  captions) with METEOR 1.5 prefix rewards against 12-word references, backward and Adam; median of a few steps,
  `reward_share` the share of the step spent computing rewards (goal ≤ 0.25).
- {"what": "meteor_rewards", "cache": false|true, "pairs_per_s": ...}: sentence METEOR of 2000 distinct
  (hypothesis, reference) pairs, first uncached, then the same pairs again from the cache.

References (the original, measured on this kind of machine): greedy 1.21 captions/s; warm-start
step 1.55 s. Goals: cache ≥ 3× the full prefix and ≥ 10× the original; step ≤ 0.7× the original.

    python benchmarks/bench_captioning.py [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.captioning.activitynet import CaptionBatch
from datasets.vocabulary import Vocabulary
from epoch_loops.captioning import rl
from epoch_loops.captioning.agent_files import build_agents
from epoch_loops.captioning.train import Trainer
from evaluation.meteor import Meteor
from evaluation.rewards import MeteorReward
from main import build_parser
from model.captioning.bmhrl import AgentConfig, BMHRLAgent, trainable_parameters
from model.captioning.decoding import greedy_decode
from model.captioning.losses import label_smoothing_loss
from utilities.config import Config

VOCAB = 10172


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def features(B: int, device, generator: torch.Generator):
    video = torch.randn(B, 20, 1024, generator=generator).to(device)
    audio = torch.randn(B, 50, 128, generator=generator).to(device)
    return video, None, audio, None


def bench_greedy(agent: BMHRLAgent, device, generator: torch.Generator, repeats: int) -> None:
    agent.eval()
    with torch.no_grad():
        agent.worker.projection.bias[agent.end_idx] = -1e4  # every caption runs to max_len
    inputs = features(32, device, generator)
    tokens = {}
    for cache in (True, False):
        times = []
        for _ in range(repeats if cache else 1):
            start = time.perf_counter()
            tokens[cache] = greedy_decode(agent, *inputs, max_len=30, use_cache=cache)
            times.append(time.perf_counter() - start)
        emit(
            what="greedy",
            cache=cache,
            B=32,
            max_len=30,
            captions_per_s=round(32 / min(times), 2),
            device=str(device),
        )
    emit(what="greedy_outputs_identical", value=bool(torch.equal(tokens[True], tokens[False])))


def bench_warm_start_step(agent: BMHRLAgent, device, generator: torch.Generator, steps: int) -> None:
    agent.train()
    agent.set_phase("warm_start")
    optimiser = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-4)
    inputs = features(16, device, generator)
    captions = torch.randint(4, VOCAB, (16, 17), generator=generator).to(device)
    captions[:, 0], captions[:, -1] = agent.start_idx, agent.end_idx
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        log_probs = agent(*inputs, captions[:, :-1]).log_probs
        loss = label_smoothing_loss(log_probs, captions[:, 1:], agent.pad_idx, 0.7)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    emit(
        what="warm_start_step",
        B=16,
        caption_tokens=17,
        seconds=round(statistics.median(times[1:]), 3),
        device=str(device),
    )


def bench_rl_step(objective: str, meteor: Meteor, device, generator: torch.Generator, steps: int) -> None:
    """A worker RL step at paper size through the training code (`rl.STEPS`), with a plain Adam step."""
    vocab = Vocabulary(["<unk>", "<blank>", "<s>", "</s>", *(f"w{i}" for i in range(VOCAB - 4))])
    torch.manual_seed(0)
    agents = build_agents(
        AgentConfig(segmenter="heuristic"), vocab, torch.randn(VOCAB, 300, generator=generator)
    )
    agents.to(device)
    cfg = vars(build_parser().parse_args(["--procedure", "train_rl_cap"]))
    cfg.update(rl_objective=objective, rl_samples=5, max_len=30, scst_baseline="greedy", device=str(device))
    references = [
        " ".join(f"w{int(i)}" for i in torch.randint(0, 300, (12,), generator=generator)) for _ in range(16)
    ]
    trainer = Trainer.create(Config(**cfg), agents, None, meteor)
    rewards = rl.Rewards(MeteorReward(meteor), {r: r for r in references}, vocab)
    video, _, audio, _ = features(16, device, generator)
    captions = torch.randint(4, 304, (16, 17), generator=generator).to(device)
    captions[:, 0], captions[:, -1] = agents.agent.start_idx, agents.agent.end_idx
    batch = CaptionBatch(video, None, audio, None, captions, captions != 1, torch.full((16,), 17), [""] * 16,
                         [0.0] * 16, [1.0] * 16, [1.0] * 16, references, list(range(16)))  # fmt: skip
    agents.agent.train()
    agents.agent.set_phase("worker")
    times, shares = [], []
    for _ in range(steps + 1):
        start, rewards.seconds = time.perf_counter(), 0.0
        result = rl.STEPS[objective](trainer, batch, "worker", rewards)
        trainer.optimizer.zero_grad(set_to_none=True)
        (result.policy_loss + result.value_loss).backward()
        trainer.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        shares.append(rewards.seconds / times[-1])
    emit(
        what="rl_step",
        objective=objective,
        B=16,
        samples=5 if objective == "scst" else 1,
        seconds=round(statistics.median(times[1:]), 3),
        reward_share=round(statistics.median(shares[1:]), 3),
        device=str(device),
    )


def bench_meteor_rewards(meteor: Meteor, generator: torch.Generator, pairs: int = 2000) -> None:
    words = [f"w{i}" for i in range(200)]

    def sentence(n: int) -> str:
        return " ".join(words[int(i)] for i in torch.randint(0, 200, (n,), generator=generator))

    hyps = [sentence(int(torch.randint(3, 15, (1,), generator=generator))) for _ in range(pairs)]
    refs = [sentence(12) for _ in range(pairs)]
    reward = MeteorReward(meteor)
    meteor.sentence_scores([("w0 w1", ["w1 w2"])])  # the JVM has loaded: time the scoring, not the start
    for cache in (False, True):
        start = time.perf_counter()
        reward.sentence(hyps, refs)
        emit(
            what="meteor_rewards",
            cache=cache,
            pairs=pairs,
            pairs_per_s=round(pairs / (time.perf_counter() - start)),
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="cached greedy runs (the best is reported)")
    parser.add_argument("--steps", type=int, default=3, help="timed warm-start steps after one warm-up")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    agent = BMHRLAgent(VOCAB, word_vectors=torch.randn(VOCAB, 300, generator=generator)).to(device)
    emit(what="model", trainable_parameters=trainable_parameters(agent), vocabulary=VOCAB)
    bench_warm_start_step(agent, device, generator, args.steps)
    bench_greedy(agent, device, generator, args.repeats)
    with Meteor() as meteor:
        meteor.start()
        bench_meteor_rewards(meteor, generator)
        for objective in ("scst", "biased_kl"):
            bench_rl_step(objective, meteor, device, generator, args.steps)


if __name__ == "__main__":
    main()
