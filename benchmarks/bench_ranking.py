"""Seconds per LR²PPO pointwise training step: forward, SmoothL1 (β 0.3), backward, AdamW, on synthetic features.

Paper size by default (seq_length 196, 16 frames, 768-d, 2 clips × 20 labels; ≈8.3 GB for weights, gradients
and AdamW state). The original takes 18.6–23.1 s per step on CPU (../shared/PERFORMANCE.md), most of it page
faults on multi-GB temporaries. The one left here is the flattened head's 2 GB weight gradient, allocated afresh
by every backward; PyTorch's `THP_MEM_ALLOC_ENABLE=1` (set below unless the environment says otherwise) backs
such allocations with 2 MB transparent huge pages, 512× fewer faults. The frames are projected once per clip (no
per-label copies) and the optimiser is torch's fused AdamW, which updates in place without parameter-sized
temporaries.

    python benchmarks/bench_ranking.py [--clips 2] [--labels 20] [--steps 3] [--adamw fused|foreach|for-loop]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by torch's CPU allocator at its first allocation

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.label_ranking import LabelRankingConfig


def adamw(model: torch.nn.Module, impl: str) -> torch.optim.AdamW:
    """PyTorch's no-decay groups: biases and 1-d weights (norms, pooling queries) get no weight decay."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(groups, lr=2e-5, eps=1e-6, **flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--labels", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--adamw", default="fused", choices=["fused", "foreach", "for-loop"])
    parser.add_argument("--scorer_head", default="flattened", choices=["flattened", "pooled"])
    args = parser.parse_args()

    torch.manual_seed(0)
    sizes = LabelRankingConfig(scorer_head=args.scorer_head)
    model = sizes.build_scorer().train()
    optimizer = adamw(model, args.adamw)
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


if __name__ == "__main__":
    main()
