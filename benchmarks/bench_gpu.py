"""GPU throughput, memory and host share of the training steps at paper size (issue 15, item 8), each with and
without `--amp bf16`, one JSON line per measurement:

    {"what": "warm_start_step"|"rl_step"|"ppo_update"|"greedy", "amp": "none"|"bf16", "samples_per_s": ...,
     "peak_mem_gb": ..., "host_share": ...}

- warm_start_step: one warm-start step of the BMHRL agent (|V| = 10172, the paper's sizes) through the training
  loop (`warm_start_epoch` over a one-batch loader: the copy to the device, the label-smoothing loss and
  `optimiser_step`), --B 16 segments with 17-token captions; samples = segments.
- rl_step: one scst worker step through `rl_epoch` (K = 5 samples of up to 30 tokens per segment, the greedy
  baseline, CIDEr-D prefix rewards, computed on the host; no Java needed); samples = segments.
- ppo_update: one LR²PPO update (`epoch_loops.ranking.ppo.update`) over a rollout of 24 pairs with the paper's
  flattened scorer head, each minibatch's features re-read from HDF5; samples = pairs.
- greedy: cached greedy decoding of 32 segments to 30 tokens (the end token suppressed); samples = captions.

samples_per_s: samples / the median wall time of --steps steps after a warm-up step, the device synchronised at
the end of each. peak_mem_gb: `torch.cuda.max_memory_allocated` over the timed steps (weights, gradients,
optimiser state and activations; each measurement builds its models afresh). host_share: the share of the step's
wall time in which no GPU work runs (data, rewards, Python, kernel launches), 1 − device time / wall time. The
device time is the sum of the durations of the step's kernels and copies, read from CUDA's own activity records
(`torch.profiler`, one extra profiled step: its overhead inflates only that step's wall time, not the figure);
kernels of one stream do not overlap. CUDA events around the step would time its span on the device, which equals
the wall time whenever the host waits for the result, and cannot tell idle gaps from work.

Without CUDA it prints one line (`{"what": "skipped", "reason": ...}`) and exits 0. `--device cpu --small` runs
the same code paths at toy sizes on the CPU (peak_mem_gb and host_share null): the test of this script.

    python benchmarks/bench_gpu.py [--amp none bf16] [--steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_ranking import ppo_setup
from datasets.captioning.activitynet import CaptionBatch
from datasets.vocabulary import Vocabulary
from epoch_loops.captioning import rl
from epoch_loops.captioning.agent_files import build_agents
from epoch_loops.captioning.train import Trainer, warm_start_epoch
from epoch_loops.ranking.ppo import collect, update
from epoch_loops.training import Optimisation, adamw, autocast, linear_schedule
from evaluation.rewards import CiderReward
from main import build_parser
from model.captioning.bmhrl import AgentConfig
from model.captioning.decoding import greedy_decode
from model.ranking.scorer import LabelRankingConfig
from utilities.config import Config

PAPER_VOCAB = 10172
SMALL_AGENT = {
    "d_model_caps": 16,
    "d_model": 32,
    "rl_att_heads": 2,
    "rl_att_layers": 1,
    "rl_ff_v": 32,
    "rl_ff_a": 32,
    "rl_goal_d": 8,
}
SMALL_RANKING = {
    "seq_length": 8,
    "max_imgs": 4,
    "visual_feat_dim": 32,
    "text_feat_dim": 32,
    "feedforward_size": 64,
    "xit_heads": 2,
}
B, CAPTION_TOKENS, GREEDY_B, MAX_LEN, RL_SAMPLES, PPO_PAIRS = 16, 17, 32, 30, 5, 24


# ---- measuring --------------------------------------------------------------------------------------------------


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_seconds(step: Callable[[], None], device: torch.device) -> float:
    """The summed durations of one step's GPU kernels and copies, from CUDA's activity records."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    return sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6


def measure(what: str, amp: str, samples: int, step: Callable[[], None], args: argparse.Namespace) -> None:
    """Warm up, time --steps steps, and emit the measurement's line."""
    device = torch.device(args.device)
    step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    wall = statistics.median(times)
    peak = host = None
    if device.type == "cuda":
        peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        host = round(max(0.0, 1 - device_seconds(step, device) / wall), 3)
    emit(what=what, amp=amp, samples_per_s=round(samples / wall, 3), peak_mem_gb=peak, host_share=host)


# ---- the captioning steps ---------------------------------------------------------------------------------------


class OneBatchLoader(list):
    """A training loader of one batch (on the host, pinned for a CUDA run): each epoch is one step."""

    class sampler:
        @staticmethod
        def set_epoch(epoch: int) -> None:
            pass


def captioning_trainer(args: argparse.Namespace, amp: str) -> Trainer:
    """The agent at the paper's sizes (heuristic segmenter: no critic file needed), its optimiser and scst
    settings, with a one-batch loader and CIDEr-D rewards against the batch's references."""
    generator = torch.Generator().manual_seed(0)
    size = 50 if args.small else PAPER_VOCAB
    vocab = Vocabulary(["<unk>", "<blank>", "<s>", "</s>", *(f"w{i}" for i in range(size - 4))])
    agent_cfg = AgentConfig(segmenter="heuristic", **(SMALL_AGENT if args.small else {}))
    word_vectors = torch.randn(size, agent_cfg.d_model_caps, generator=generator)
    agents = build_agents(agent_cfg, vocab, word_vectors)
    cfg = vars(build_parser().parse_args(["--procedure", "train_rl_cap"]))
    cfg.update(amp=amp, device=args.device, rl_objective="scst", rl_samples=RL_SAMPLES, max_len=MAX_LEN)
    cfg.update(scst_baseline="greedy", rl_reward="cider")
    references = [
        " ".join(f"w{int(i)}" for i in torch.randint(0, 300, (12,), generator=generator)) for _ in range(B)
    ]
    captions = torch.randint(4, min(size, 304), (B, CAPTION_TOKENS), generator=generator)
    captions[:, 0], captions[:, -1] = vocab.start_idx, vocab.end_idx
    batch = CaptionBatch(
        torch.randn(B, 20, agent_cfg.d_vid, generator=generator), None,
        torch.randn(B, 50, agent_cfg.d_aud, generator=generator), None,
        captions, captions != vocab.pad_idx, torch.full((B,), CAPTION_TOKENS), [""] * B,
        [0.0] * B, [1.0] * B, [1.0] * B, references, list(range(B)),
    )  # fmt: skip
    if args.device.startswith("cuda"):
        batch = batch.pin_memory()
    batch.stand_in = False
    trainer = Trainer.create(Config(**cfg), agents, OneBatchLoader([batch]), meteor=None)
    trainer.rewards = rl.Rewards(CiderReward(references), {r: r for r in references}, vocab)
    return trainer


def bench_warm_start_step(args: argparse.Namespace, amp: str) -> None:
    trainer = captioning_trainer(args, amp)
    measure("warm_start_step", amp, B, lambda: warm_start_epoch(trainer, 0), args)


def bench_rl_step(args: argparse.Namespace, amp: str) -> None:
    trainer = captioning_trainer(args, amp)
    measure("rl_step", amp, B, lambda: rl.rl_epoch(trainer, 0, "worker"), args)


def bench_greedy(args: argparse.Namespace, amp: str) -> None:
    trainer = captioning_trainer(args, amp)
    agent, device = trainer.agents.agent, trainer.device
    agent.eval()
    with torch.no_grad():
        agent.worker.projection.bias[agent.end_idx] = -1e4  # every caption runs to MAX_LEN
    generator = torch.Generator().manual_seed(1)
    video = torch.randn(GREEDY_B, 20, agent.cfg.d_vid, generator=generator).to(device)
    audio = torch.randn(GREEDY_B, 50, agent.cfg.d_aud, generator=generator).to(device)

    def step() -> None:
        with trainer.autocast():
            greedy_decode(agent, video, None, audio, None, max_len=MAX_LEN)

    measure("greedy", amp, GREEDY_B, step, args)


# ---- the PPO update ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def ppo_update_step(args: argparse.Namespace, amp: str) -> Iterator[Callable[[], None]]:
    """LR²PPO's update over one rollout of PPO_PAIRS pairs (features in a temporary HDF5 file)."""
    setup = argparse.Namespace(
        ppo_batch=PPO_PAIRS, ppo_objective="lr2ppo", device=args.device, ppo_scorer_head="flattened"
    )
    sizes = LabelRankingConfig(scorer_head="flattened", **(SMALL_RANKING if args.small else {}))
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as folder:
        cfg, dataset, models = ppo_setup(setup, Path(folder), sizes)
        cfg.amp = amp
        optimizer = adamw([(models.actor, 1e-5), (models.critic, 1e-5)], 0.01)
        opt = Optimisation("ppo", optimizer, None, scheduler=linear_schedule(optimizer, 1000, 0.0))
        from epoch_loops.ranking import stages as ranking

        batch = next(iter(ranking.loader(cfg, dataset, epoch=0, shuffle=True))).to(args.device)
        with autocast(amp, device):
            rollout = collect(cfg, models, batch, torch.Generator(args.device).manual_seed(0))

        def step() -> None:
            with autocast(amp, device):
                update(cfg, models, dataset, rollout, opt, 0, {})

        yield step


def bench_ppo_update(args: argparse.Namespace, amp: str) -> None:
    with ppo_update_step(args, amp) as step:
        measure("ppo_update", amp, PPO_PAIRS, step, args)


# ---- main -------------------------------------------------------------------------------------------------------

BENCHMARKS = {
    "warm_start_step": bench_warm_start_step,
    "rl_step": bench_rl_step,
    "ppo_update": bench_ppo_update,
    "greedy": bench_greedy,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (or cuda:N); cpu only with --small")
    parser.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=["none", "bf16", "fp16"])
    parser.add_argument("--what", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument(
        "--small", action="store_true", help="toy sizes: a check of the code paths, not a figure"
    )
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        emit(what="skipped", reason="CUDA is not available: bench_gpu.py measures GPU steps")
        return 0
    if not args.device.startswith("cuda") and not args.small:
        parser.error("--device cpu runs only with --small (the paper-size figures are GPU figures)")
    for amp in args.amp:
        for what in args.what:
            torch.manual_seed(0)
            BENCHMARKS[what](args, amp)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the next measurement's peak is its own
    return 0


if __name__ == "__main__":
    sys.exit(main())
