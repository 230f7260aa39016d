"""LR²PPO speed: the pointwise training step, the PPO iteration and the rollout buffer's memory, as JSON lines.

Pointwise: seconds per training step (forward, SmoothL1 β 0.3, backward, AdamW) on synthetic features.

Paper size by default (seq_length 196, 16 frames, 768-d, 2 clips × 20 labels; ≈8.3 GB for weights, gradients
and AdamW state). The original takes 18.6–23.1 s per step on CPU (measured on this kind of machine), most of it page
faults on multi-GB temporaries. The one left here is the flattened head's 2 GB weight gradient, allocated afresh
by every backward; PyTorch's `THP_MEM_ALLOC_ENABLE=1` (set below unless the environment says otherwise) backs
such allocations with 2 MB transparent huge pages, 512× fewer faults. The frames are projected once per clip (no
per-label copies) and the optimiser is torch's fused AdamW, which updates in place without parameter-sized
temporaries.

PPO (`ppo_samples_per_s`): label pairs per second through the real rollout (actor, frozen reward model, critic)
and update (features re-read from an HDF5 file per minibatch, actor + critic forward/backward, AdamW) with
`--ppo_batch` pairs per rollout batch and minibatch. On CPU it runs with `--ppo_scorer_head pooled` by default
(seq_length 196, 16 frames, 768-d, but without the 502 M-parameter flattened layer: actor, critic, reward model
and reference at paper size need about 25 GB); `--ppo_scorer_head flattened` is the paper's size (GPU).
Rollout buffer (`rollout_buffer_bytes`): bytes per 1,000 pairs of our buffer (ids, positions, scalars) against
the original's, which kept every pair's text [2, 196, 768] and per-label frames [2, 16, 768] in float32.

    python benchmarks/bench_ranking.py [--clips 2] [--labels 20] [--steps 3] [--adamw fused|unfused]
        [--what pointwise ppo buffer] [--ppo_batch 24] [--ppo_scorer_head pooled|flattened]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch's CPU allocator at its first allocation

import h5py
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from epoch_loops.training import Optimisation, adamw, linear_schedule
from model.ranking.scorer import LabelRankingConfig


def bench_pointwise(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    sizes = LabelRankingConfig(scorer_head=args.scorer_head)
    model = sizes.build_scorer().train()
    optimizer = adamw([(model, 2e-5)], 0.01, fused=args.adamw == "fused")
    frames = torch.randn(args.clips, sizes.max_imgs, sizes.visual_feat_dim)
    text = torch.randn(args.clips, args.labels, sizes.seq_length, sizes.text_feat_dim)
    targets = torch.randint(0, 3, (args.clips, args.labels)).float()

    times, cpu_times = [], []
    for step in range(args.steps + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = F.smooth_l1_loss(model(frames, text), targets, beta=0.3)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)

    seconds = statistics.median(times)
    # CPU time of all threads: steadier than wall time on a shared machine
    cpu_seconds = statistics.median(cpu_times)
    common = {
        "clips": args.clips,
        "labels": args.labels,
        "adamw": args.adamw,
        "scorer_head": args.scorer_head,
    }
    common |= {"device": "cpu", "threads": torch.get_num_threads(), "thp": os.environ["THP_MEM_ALLOC_ENABLE"]}
    step_times = {"seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3), "all_seconds": times}
    print(json.dumps({"what": "pointwise_step", **common, **step_times}))
    print(
        json.dumps(
            {"what": "pointwise_samples_per_s", **common, "clips_per_s": round(args.clips / seconds, 4)}
        )
    )
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"what": "pointwise_peak_rss_gb", **common, "gb": round(peak_gb, 2)}))


def ppo_setup(args: argparse.Namespace, folder: Path, sizes: LabelRankingConfig | None = None):
    """Synthetic clips in the real HDF5 layout, the PPO models at the benchmark size (paper size with
    `--ppo_scorer_head` unless `sizes` says otherwise), and the run settings."""
    from datasets.ranking.lrmovienet import ClipFeatures, PPOPairDataset, read_clip_list
    from epoch_loops.ranking.ppo import PPOModels
    from main import build_parser
    from utilities.config import config_from_argv

    sizes = sizes or LabelRankingConfig(scorer_head=args.ppo_scorer_head)
    n_clips, n_labels = args.ppo_batch, 4
    with h5py.File(folder / "feat.h5", "w") as h5:
        for c in range(n_clips):
            group = h5.create_group(f"c{c}")
            group["text_emb"] = np.random.randn(n_labels, sizes.seq_length, sizes.text_feat_dim).astype(
                np.float32
            )
            group["img_emb"] = np.random.randn(1, 20, sizes.visual_feat_dim).astype(np.float32)
    clips = [
        {"id": f"c{c}", "tags": [{"tag": f"t{i}", "target": i % 3} for i in range(n_labels)]}
        for c in range(n_clips)
    ]
    (folder / "clips.json").write_text(json.dumps(clips))
    argv = [
        "--procedure",
        "ppo",
        "--ppo_objective",
        args.ppo_objective,
        "--scorer_head",
        sizes.scorer_head,
    ]
    argv += ["--batch_size", str(args.ppo_batch), "--num_workers", "0", "--ppo_epochs", "1"]
    cfg = config_from_argv(build_parser(), argv)
    cfg.device = args.device
    clip_list, features = read_clip_list(folder / "clips.json"), ClipFeatures(folder / "feat.h5")
    dataset = PPOPairDataset(clip_list, features, sizes.max_imgs, 1)
    actor, critic = sizes.build_scorer(), sizes.build_reward_model()
    reward = sizes.build_reward_model().requires_grad_(False)
    reference = copy.deepcopy(actor).requires_grad_(False) if args.ppo_objective == "clip" else None
    models = PPOModels(actor, critic, reward, reference, sizes)
    for model in (actor, critic, reward, reference):
        if model is not None:
            model.to(args.device).eval()
    return cfg, dataset, models


def bench_ppo(args: argparse.Namespace) -> None:
    """One PPO iteration = rollout of one batch of pairs + one update over it (one minibatch), timed."""
    import tempfile

    from epoch_loops.ranking import stages as ranking
    from epoch_loops.ranking.ppo import collect, update

    with tempfile.TemporaryDirectory() as tmp:
        cfg, dataset, models = ppo_setup(args, Path(tmp))
        optimizer = adamw([(models.actor, 1e-5), (models.critic, 1e-5)], 0.01)
        opt = Optimisation(
            "ppo", optimizer, None, scheduler=linear_schedule(optimizer, 10 * (args.steps + 1), 0.0)
        )
        times, rollout_times = [], []
        for step in range(args.steps + 1):
            sync(args.device)
            start = time.perf_counter()
            batch = next(iter(ranking.loader(cfg, dataset, epoch=step, shuffle=True))).to(args.device)
            rollout = collect(cfg, models, batch, torch.Generator(args.device).manual_seed(step))
            sync(args.device)
            rolled = time.perf_counter()
            update(cfg, models, dataset, rollout, opt, step, {})
            sync(args.device)
            if step:
                times.append(time.perf_counter() - start)
                rollout_times.append(rolled - start)
    seconds = statistics.median(times)
    line = {
        "what": "ppo_samples_per_s",
        "objective": args.ppo_objective,
        "scorer_head": args.ppo_scorer_head,
        "pairs_per_batch": args.ppo_batch,
        "trainable_parameters": sum(p.numel() for m in (models.actor, models.critic) for p in m.parameters()),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "pairs_per_s": round(args.ppo_batch / seconds, 3),
        "seconds_per_iteration": round(seconds, 3),
        "rollout_share": round(statistics.median(rollout_times) / seconds, 3),
    }
    if args.device.startswith("cuda"):
        line["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(line))


def bench_buffer(args: argparse.Namespace) -> None:
    """Bytes per 1,000 pairs: our rollout buffer (clip objective, every field set) vs the original's features."""
    from epoch_loops.ranking.ppo import Rollout

    n, sizes = 1000, LabelRankingConfig()
    rollout = Rollout(
        clip_ids=[f"tt{1000000 + i}" for i in range(n)],  # MovieNet-like ids
        labels=torch.zeros(n, 2, dtype=torch.int64),
        frame_keys=torch.zeros(n, dtype=torch.int64),
        order=torch.zeros(n, 2, dtype=torch.int64),
        scores_old=torch.zeros(n, 2),
        log_prob_old=torch.zeros(n),
        reward=torch.zeros(n),
        value_old=torch.zeros(n),
        ref_scores=torch.zeros(n, 2),
        advantage=torch.zeros(n),
    )
    original = n * 4 * 2 * (sizes.seq_length * sizes.text_feat_dim + sizes.max_imgs * sizes.visual_feat_dim)
    ours = rollout.nbytes()
    print(
        json.dumps(
            {
                "what": "rollout_buffer_bytes",
                "pairs": n,
                "ours_bytes": ours,
                "original_bytes": original,
                "ratio": round(original / ours, 1),
            }
        )
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--what", nargs="+", default=["pointwise", "ppo", "buffer"], help="which figures")
    parser.add_argument("--clips", type=int, default=2, help="pointwise: clips per step")
    parser.add_argument("--labels", type=int, default=20, help="pointwise: labels per clip")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument(
        "--adamw", default="fused", choices=["fused", "unfused"], help="training.adamw's fused flag"
    )
    parser.add_argument("--scorer_head", default="flattened", choices=["flattened", "pooled"])
    parser.add_argument(
        "--ppo_batch", type=int, default=24, help="ppo: pairs per rollout batch (the original's)"
    )
    parser.add_argument("--ppo_objective", default="lr2ppo", choices=["lr2ppo", "clip"])
    parser.add_argument("--ppo_scorer_head", default="pooled", choices=["flattened", "pooled"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    for what in args.what:
        {"pointwise": bench_pointwise, "ppo": bench_ppo, "buffer": bench_buffer}[what](args)


if __name__ == "__main__":
    main()
