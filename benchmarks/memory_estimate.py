"""Per-GPU memory of each training procedure at paper size, computed on the CPU (no GPU needed), as the table of
docs/multi-gpu.md (markdown) or JSON lines (`--json`).

For each procedure:
  static = 4 B per weight (fp32, trained or frozen) + 4 B per trained weight (its gradient) + 8 B per trained
           weight (Adam/AdamW's two moments); exact counts from the real model constructors at paper size.
  activations = the bytes of the tensors autograd keeps for the backward pass of one training forward
           (`torch.autograd.graph.saved_tensors_hooks`, each storage counted once, the weights' own storages left
           out: they are counted above), measured on `measured` samples
           on the CPU in fp32 and scaled linearly to the default global batch; under torchrun with N processes each
           GPU holds 1/N of it (the static part is replicated on every GPU).

Left out: CUDA's context (about 0.5 GB), the caching allocator's slack and the backward pass's temporaries, and
bf16 autocast (which roughly halves the activations). benchmarks/bench_gpu.py measures the real peaks on a GPU.

    python benchmarks/memory_estimate.py [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_gpu
from epoch_loops.captioning import rl
from epoch_loops.captioning.train import warm_start_loss
from model.captioning.bmhrl import SegmentCritic
from model.captioning.proposals import MODALITIES, ProposalConfig, ProposalGenerator
from model.ranking.scorer import LabelRankingConfig

GB = 2**30
VIDEO_ROWS = 300  # train_prop: a whole video, padded (ActivityNet's videos run 2-5 min at ~1 feature row/s)
CAPTION_TOKENS = 20  # train_critic
LABELS_PER_CLIP = 20  # pointwise (bench_ranking's figure)


@dataclass
class Estimate:
    procedure: str
    batch: str  # the default global batch, in words
    weights: int
    trained: int
    activation_bytes: float  # at the default global batch on one process

    def static_gb(self) -> float:
        return (4 * self.weights + 12 * self.trained) / GB

    def per_gpu_gb(self, n: int) -> float:
        return self.static_gb() + self.activation_bytes / n / GB


def saved_bytes(forward: Callable[[], object], *models: nn.Module) -> int:
    """Bytes of the tensors autograd saves during `forward()`, each storage once, those of `models`' weights
    left out."""
    weights = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def counts(*modules: nn.Module) -> tuple[int, int]:
    """(all weights, trained weights) of `modules`, shared parameters once."""
    params = {id(p): p for m in modules for p in m.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ---- captioning -------------------------------------------------------------------------------------------------


def captioning() -> list[Estimate]:
    args = argparse.Namespace(small=False, device="cpu")
    trainer = bench_gpu.captioning_trainer(args, "none")
    agents, batch = trainer.agents, trainer.train_batches[0]
    # the run's agent holds the frozen pretrained critic as its segmenter (15.1 M weights)
    weights, trained = counts(agents.agent, agents.worker_value, agents.manager_value, SegmentCritic())
    B = bench_gpu.B
    modules = (agents.agent, agents.worker_value, agents.manager_value)
    warm = saved_bytes(lambda: warm_start_loss(agents.agent, batch, trainer.cfg.smoothing), *modules)
    agents.agent.set_phase("worker")
    scst = saved_bytes(lambda: rl.scst_step(trainer, batch, "worker", trainer.rewards), *modules)
    segments = f"--B {B} segments (20 video, 50 audio rows"
    critic = SegmentCritic()
    ids = torch.randn(4, CAPTION_TOKENS, 300)
    return [
        Estimate("train_rl_cap (warm start)", f"{segments}, 17-token captions)", weights, trained, warm),
        Estimate(
            "train_rl_cap (RL, scst)",
            f"{segments}, {bench_gpu.RL_SAMPLES} samples of 30 tokens each)",
            weights,
            trained,
            scst,
        ),
        Estimate(
            "train_critic",
            f"--B 16 captions of {CAPTION_TOKENS} tokens",
            *counts(critic),
            saved_bytes(lambda: critic.logits(ids), critic) * 16 / 4,
        ),
    ]


def proposals() -> Estimate:
    anchors = {"audio": tuple(range(1, 49)), "video": tuple(range(1, 129))}  # BMT's 48 and 128
    model = ProposalGenerator(ProposalConfig(anchors=anchors)).train()
    for p in model.encoder.parameters():
        p.requires_grad = False  # frozen unless --finetune_cap_encoder
    features = {"video": torch.randn(1, VIDEO_ROWS, 1024), "audio": torch.randn(1, VIDEO_ROWS, 128)}
    masks = {m: torch.ones(1, 1, VIDEO_ROWS, dtype=torch.bool) for m in MODALITIES}
    inputs = (features["video"], masks["video"], features["audio"], masks["audio"])
    forward = saved_bytes(lambda: model(*inputs), model)
    return Estimate("train_prop", f"--B 16 videos of {VIDEO_ROWS} rows", *counts(model), forward * 16)


# ---- ranking ----------------------------------------------------------------------------------------------------


def ranking() -> list[Estimate]:
    sizes = LabelRankingConfig()
    frames = torch.randn(1, sizes.max_imgs, sizes.visual_feat_dim)
    scorer = sizes.build_scorer().train()
    text = torch.randn(1, LABELS_PER_CLIP, sizes.seq_length, sizes.text_feat_dim)
    targets = torch.zeros(1, LABELS_PER_CLIP)
    per_clip = saved_bytes(lambda: F.smooth_l1_loss(scorer(frames, text), targets), scorer)
    pair_text = text[:, :2]
    per_pair_actor = saved_bytes(lambda: scorer(frames, pair_text), scorer)
    scorer_counts = counts(scorer)
    reward = sizes.build_reward_model().train()
    order = torch.tensor([[0, 1, 0, 1]])
    per_pair_reward = saved_bytes(lambda: reward(frames, pair_text, order), reward)
    per_pair_critic = saved_bytes(lambda: reward(frames, pair_text), reward)
    reward_weights, _ = counts(reward)
    pairs = 32  # --batch_size (pairs) of reward and ppo; --minibatch_size defaults to it
    return [
        Estimate(
            "pointwise",
            f"--batch_size 32 clips × {LABELS_PER_CLIP} labels",
            *scorer_counts,
            per_clip * 32,
        ),
        Estimate(
            "reward", f"--batch_size {pairs} pairs", reward_weights, reward_weights, per_pair_reward * pairs
        ),
        Estimate(
            "ppo (lr2ppo; clip adds the frozen reference actor)",
            f"--batch_size {pairs} pairs per minibatch",
            scorer_counts[0] + 2 * reward_weights,  # actor, critic, frozen reward model
            scorer_counts[0] + reward_weights,
            (per_pair_actor + per_pair_critic) * pairs,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="JSON lines instead of the markdown table")
    args = parser.parse_args()
    torch.manual_seed(0)
    estimates = [*captioning(), proposals(), *ranking()]
    if args.json:
        for e in estimates:
            print(
                json.dumps(
                    {
                        **vars(e),
                        "static_gb": e.static_gb(),
                        **{f"gpus_{n}_gb": e.per_gpu_gb(n) for n in (1, 2, 4, 8)},
                    }
                )
            )
        return
    print(
        "| procedure | default global batch | weights (trained) | static GB | activations GB (1 GPU) | per GPU: 1 | 2 | 4 | 8 GPUs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for e in estimates:
        per_gpu = " | ".join(f"{e.per_gpu_gb(n):.1f}" for n in (1, 2, 4, 8))
        print(
            f"| {e.procedure} | {e.batch} | {e.weights / 1e6:.1f} M ({e.trained / 1e6:.1f} M) | {e.static_gb():.1f} | "
            f"{e.activation_bytes / GB:.2f} | {per_gpu} |"
        )


if __name__ == "__main__":
    main()
