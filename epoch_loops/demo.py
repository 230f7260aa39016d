"""`main.py --procedure demo`: the framework end to end on its built-in demo data.

It generates the demo dataset (the real on-disk formats), reads it through the same data pipeline as real
ActivityNet Captions, and captions every ground-truth segment of val_1 and val_2 three ways, each scored with the
official dense-captioning evaluator (ground-truth proposals: tIoU 0.5, one reference file per split, the BMT
protocol):
- the BMHRL agent after its supervised warm start (`train_rl_cap` with the small configuration `DEMO_AGENT`);
- the same agent after RL epochs with each objective (`DEMO_RL`: scst and biased_kl), both starting from the
  warm start's checkpoint (its weights copied, not retrained); the mean training reward of every RL epoch is
  reported beside the final METEOR;
- a nearest-neighbour retrieval baseline (the caption of the train segment whose pooled video+audio features are
  closest);
- a most-frequent-caption baseline: its gap to the other two shows that the features carry the captions' content.
Then the full-video pipeline (`proposals_demo`): the proposal generator trained on the warm start's encoder,
its val_1 proposals against a uniform grid of windows at the same K, and the agent captioning its own proposals.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from datasets.captioning.activitynet import (
    CaptionDataset,
    build_caption_dataset,
    open_stores,
    read_captions_csv,
)
from datasets.captioning.proposals import VideoDataset, videos_of
from datasets.demo import ensure_demo_dataset
from datasets.loader import val_loader
from datasets.vocabulary import vocabulary_from_config
from epoch_loops.captioning.proposal_eval import caption_proposals
from epoch_loops.captioning.proposal_files import PROP_FILE, load_proposal_generator
from epoch_loops.captioning.proposals import propose, train_prop, uniform_proposals
from epoch_loops.captioning.train import submission_of, train
from epoch_loops.ranking.demo import ranking_demo
from evaluation.densevid import AVERAGE_KEY, DenseCaptioningEvaluator, format_table
from evaluation.meteor import Meteor
from utilities.config import Config
from utilities.log import progress
from utilities.run_dir import RunDir

log = logging.getLogger(__name__)
SPLITS = ("val_1", "val_2")
BASELINES = ("most_frequent", "nearest_neighbour")

# The agent's demo configuration: small sizes (the features keep their real widths, 1024 and 128), random word
# vectors, the heuristic segmenter (no critic checkpoint), and a warm start validated once, at its end. Its label
# smoothing is 0.1, not BMT's 0.7: RL samples from the warm-started policy, and ε = 0.7 leaves it so flat (token
# entropy 3.3 nats against 1.2-1.4 at 0.1) that sampled captions score a quarter of the greedy caption's METEOR.
DEMO_AGENT = {
    "mode": "BMHRL",
    "segmenter": "heuristic",
    "word_emb_caps": "random",
    "d_model_caps": 64,
    "d_model": 64,
    "rl_att_heads": 4,
    "rl_att_layers": 1,
    "rl_ff_v": 128,
    "rl_ff_a": 128,
    "rl_goal_d": 16,
    "rl_goal_att_heads": 2,
    "dout_p": 0.1,
    "smoothing": 0.1,
    "B": 16,
    "rl_warmstart_epochs": 8,
    "epoch_num": 8,
    "one_by_one_starts_at": 7,
    "rl_cap_warmstart_lr": 1e-3,
    "grad_clip": 1.0,
    "max_len": 20,
    "beam_size": 1,
    "vocab_path": None,
    "rl_pretrained_model_dir": None,
    "resume": None,
    "metrics_out": None,
}

# The RL runs after the warm start, one per objective, each from the warm start's checkpoint with a fresh
# optimiser and validated once, after its last epoch. Epochs alternate worker, manager, worker, ...; scst runs five
# so that its first and last epochs train the same module (a manager epoch explores, at a lower reward).
# scst is trained on CIDEr-D with the mean-of-the-other-samples baseline: sampled freely, METEOR 1.5 pays for
# repeating matched words (recall-weighted), and METEOR-trained scst made 12 of 113 val_1 captions repeat a trigram
# (1 after the warm start). biased_kl samples under teacher forcing, where nothing can repeat: the paper's METEOR.
# The settings were tuned on the demo's seeds 0-3 (README).
# The proposal generator's demo configuration: train_prop on the warm start's (frozen) encoder with small heads;
# K = 10 proposals per video (the demo's videos hold 2-4 events; BMT's 100 suits ActivityNet's longer lists).
DEMO_PROPOSALS = {
    "procedure": "train_prop",
    "anchors_num_audio": 8,
    "anchors_num_video": 8,
    "kernel_sizes_audio": [5, 13],
    "kernel_sizes_video": [1, 5],
    "conv_layers_audio": [32, 32],
    "conv_layers_video": [32, 32],
    "prop_lr": 1e-3,
    "B": 16,
    "epoch_num": 6,
    "max_prop_per_vid": 10,
    "finetune_cap_encoder": False,
    "pretrained_cap_model_path": None,
    "resume": None,
    "metrics_out": None,
}

RL_OBJECTIVES = ("biased_kl", "scst")
DEMO_RL = {
    "biased_kl": {"rl_reward": "meteor", "rl_cap_lr": 3e-4, "epoch_num": 4},
    "scst": {
        "rl_reward": "cider",
        "scst_baseline": "mean",
        "rl_samples": 8,
        "rl_cap_lr": 3e-5,
        "epoch_num": 5,
    },
}
DEMO_RL_SHARED = {"rl_warmstart_epochs": 0, "rl_value_function_lr": 1e-3}


def demo(cfg: Config, run: RunDir) -> None:
    paths = ensure_demo_dataset(cfg.demo_dir)
    for key, value in paths.config_overrides().items():
        setattr(cfg, key, value)

    train_captions = _read_train_captions(cfg)
    vocab = vocabulary_from_config(cfg, train_captions)
    stores = open_stores(cfg)
    datasets = {
        split: build_caption_dataset(cfg, getattr(cfg, f"{split}_meta_path"), vocab, stores)
        for split in ("train", *SPLITS)
    }
    print(f"demo data: {paths.root} | " + " | ".join(f"{s}: {len(d)} segments" for s, d in datasets.items()))
    agent_cfg = Config(**{**cfg.to_dict(), **DEMO_AGENT, "procedure": "train_rl_cap"})
    if cfg.dry_run:
        with RunDir(run.path / "agent", agent_cfg) as agent_run:
            train(agent_cfg, agent_run)
        return

    train_keys = pooled_features(cfg, datasets["train"], "train")
    train_segments = datasets["train"].segments
    most_frequent = Counter(s.caption for s in train_segments).most_common(1)[0][0]
    metrics: dict[str, dict] = {}
    with Meteor() as meteor:
        for split in SPLITS:
            dataset = datasets[split]
            nearest = nearest_neighbours(pooled_features(cfg, dataset, split), train_keys)
            baselines = {
                "nearest_neighbour": [train_segments[i].caption for i in nearest.tolist()],
                "most_frequent": [most_frequent] * len(dataset),
            }
            reference = getattr(paths, f"{split}_json")
            evaluator = DenseCaptioningEvaluator(
                [reference], tious=[0.5], max_proposals=cfg.max_prop_per_vid, seed=cfg.seed, meteor=meteor
            )
            for name, sentences in baselines.items():
                submission = submission_of(dataset.segments, sentences)
                run.write_json(f"captioning_results_{split}_{name}.json", submission)
                report = evaluator.evaluate(submission["results"], source=f"{name} on {split}")
                metrics[f"{split}/{name}"] = report.metrics["0.5"]
                print(f"\n{name} baseline on {split} ({report.provenance()})")
                print(format_table(report))
        print(
            f"\nthe BMHRL agent: {agent_cfg.rl_warmstart_epochs} warm-start epochs (run: {run.path / 'agent'})"
        )
        with RunDir(run.materialise() / "agent", agent_cfg) as agent_run:
            state = train(agent_cfg, agent_run, meteor=meteor)
        for split in SPLITS:
            metrics[f"{split}/warm_start"] = state.history[-1]["val"][split]
        warm_start = run.path / "agent" / "checkpoints" / "last"
        for objective in RL_OBJECTIVES:
            rl_dir = run.path / f"agent_rl_{objective}"
            rl_cfg = Config(
                **{
                    **agent_cfg.to_dict(),
                    **DEMO_RL_SHARED,
                    **DEMO_RL[objective],
                    "rl_objective": objective,
                    "one_by_one_starts_at": DEMO_RL[objective]["epoch_num"] - 1,
                    "rl_pretrained_model_dir": str(warm_start),
                }
            )
            print(f"\nRL from the warm start: {objective}, {rl_cfg.epoch_num} epochs (run: {rl_dir})")
            with RunDir(rl_dir, rl_cfg) as rl_run:
                rl_state = train(rl_cfg, rl_run, meteor=meteor)
            for split in SPLITS:
                metrics[f"{split}/rl_{objective}"] = rl_state.history[-1]["val"][split]
            metrics[f"rl_reward/{objective}"] = [r["train"]["reward"] for r in rl_state.history]
        metrics.update(proposals_demo(cfg, run, warm_start, meteor=meteor))
    methods = (*BASELINES, "warm_start", *(f"rl_{o}" for o in RL_OBJECTIVES))
    for name in methods:
        mean_meteor = sum(metrics[f"{s}/{name}"]["METEOR"] for s in SPLITS) / len(SPLITS)
        metrics[f"mean/{name}"] = {"METEOR": mean_meteor}
        if run.writer is not None:
            run.writer.add_scalar(f"demo/{name}_meteor", 100 * mean_meteor)
    metrics.update(ranking_demo(cfg, run))
    run.write_metrics("metrics.json", metrics, cfg.metrics_out)
    rewards = "; ".join(
        f"{o} " + " ".join(f"{r:.4f}" for r in metrics[f"rl_reward/{o}"]) for o in RL_OBJECTIVES
    )
    print(f"\nmean training reward per RL epoch: {rewards}")
    print("\n" + comparison_table(metrics, methods) + f"\n(run: {run.path})")


def proposals_demo(
    cfg: Config, run: RunDir, agent_dir: Path, captions: bool = True, meteor: Meteor | None = None
) -> dict[str, dict]:
    """Train the proposal generator on `agent_dir`'s encoder (`DEMO_PROPOSALS`), compare its val_1 proposals
    with the uniform grid at the same K (detection P/R/F1 averaged over the tIoUs against both references), and
    (`captions`) let the agent caption its own proposals: `dense/learned_proposals` METEOR and SODA_c."""
    prop_cfg = Config(**{**cfg.to_dict(), **DEMO_PROPOSALS, "rl_pretrained_model_dir": str(agent_dir)})
    print(f"\nthe proposal generator: {prop_cfg.epoch_num} train_prop epochs (run: {run.path / 'proposals'})")
    with RunDir(run.materialise() / "proposals", prop_cfg) as prop_run:
        train_prop(prop_cfg, prop_run)
    model, state = load_proposal_generator(prop_run.checkpoints / PROP_FILE)
    model.to(cfg.device)
    stores = open_stores(prop_cfg)
    videos = videos_of(read_captions_csv(prop_cfg.val_1_meta_path).segments)
    learned = propose(model, VideoDataset(videos, stores), prop_cfg)
    lengths = [*state["anchors"]["audio"], *state["anchors"]["video"]]
    uniform = uniform_proposals(videos, lengths, prop_cfg.max_prop_per_vid)
    metrics: dict[str, dict] = {}
    with DenseCaptioningEvaluator(
        cfg.reference_paths, tious=cfg.tIoUs, max_proposals=prop_cfg.max_prop_per_vid, detection_only=True
    ) as evaluator:
        for name, results in (("learned", learned), ("uniform", uniform)):
            run.write_json(f"prop_results_val_1_{name}.json", {"results": results})
            average = evaluator.detection(results, source=f"{name} proposals")[AVERAGE_KEY]
            metrics[f"proposals/{name}"] = {
                "precision": average["Precision"], "recall": average["Recall"], "F1": average["F1"]
            }  # fmt: skip
            print(
                f"{name} proposals (K = {prop_cfg.max_prop_per_vid}): P {average['Precision']:.4f} "
                f"R {average['Recall']:.4f} F1 {average['F1']:.4f}"
            )
    if captions:
        caption_cfg = Config(**{**prop_cfg.to_dict(), **DEMO_AGENT, "proposals": "the learned proposals"})
        caption_cfg.rl_pretrained_model_dir = str(agent_dir)
        caption_cfg.max_prop_per_vid = prop_cfg.max_prop_per_vid
        report = caption_proposals(caption_cfg, run, learned, meteor=meteor)
        average = report.metrics[AVERAGE_KEY]
        metrics["dense/learned_proposals"] = {"METEOR": average["METEOR"], "SODA_c": average["SODA_c"]}
        print(
            f"the agent on its own proposals: METEOR {average['METEOR']:.4f} SODA_c {average['SODA_c']:.4f}"
        )
    return metrics


def comparison_table(metrics: dict[str, dict], methods: tuple[str, ...]) -> str:
    """METEOR, BLEU@4 and CIDEr (×100) of each method on each split, and the mean METEOR."""
    header = ["method", *(f"{s} {m}" for s in SPLITS for m in ("METEOR", "Bleu_4", "CIDEr")), "mean METEOR"]
    rows = [
        [
            name,
            *(
                f"{100 * metrics[f'{s}/{name}'][m]:.2f}"
                for s in SPLITS
                for m in ("METEOR", "Bleu_4", "CIDEr")
            ),
            f"{100 * metrics[f'mean/{name}']['METEOR']:.2f}",
        ]
        for name in methods
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _read_train_captions(cfg: Config) -> list[str]:
    return [segment.caption for segment in read_captions_csv(cfg.train_meta_path).segments]


@torch.no_grad()
def pooled_features(cfg: Config, dataset: CaptionDataset, name: str) -> torch.Tensor:
    """One unit-length key per segment: the masked means of its video and audio rows, each normalised."""
    keys = []
    for batch in progress(val_loader(cfg, dataset), desc=f"pooling {name}"):
        parts = [
            F.normalize((x * m[..., None]).sum(1) / m.sum(1, keepdim=True), dim=-1)
            for x, m in ((batch.video, batch.video_mask), (batch.audio, batch.audio_mask))
            if x is not None
        ]
        keys.append(F.normalize(torch.cat(parts, dim=-1), dim=-1))
    return torch.cat(keys)


def nearest_neighbours(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar key for every query (the lowest index wins a tie)."""
    return (queries @ keys.T).argmax(dim=1)
