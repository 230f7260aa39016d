"""Evaluation on learned proposals: the agent captions the proposals of every validation video, and
the official evaluator scores them against both references at every tIoU, plus SODA_c.

    python main.py --procedure eval --task captioning --rl_pretrained_model_dir DIR --proposals P.json
    python main.py --procedure eval --task proposals (--proposals P.json | --prop_generator_model_path M.pt)

Proposal files are BMT's format, `{"results": {vid: [{"sentence", "proposal_score", "timestamp": [s, e]}]}}`,
in descending score order; the first `--max_prop_per_vid` (100) of each video are used. As BMT, only the
videos of `--val_1_meta_path` (whose durations the crops need) with features are captioned; proposals of other
videos are ignored. The captions are decoded in batches (greedy with the key/value cache, or --beam_size).
"""

from __future__ import annotations

import torch

from datasets.captioning.activitynet import (
    CaptionDataset,
    Segment,
    drop_missing,
    open_stores,
    read_captions_csv,
)
from datasets.captioning.proposals import VideoDataset, videos_of
from datasets.loader import caption_loaders
from epoch_loops.captioning.agent_files import load_agents
from epoch_loops.captioning.proposal_files import load_proposal_generator
from epoch_loops.captioning.proposals import propose
from epoch_loops.captioning.train import MODALITY_OF_MODE, caption_segments, submission_of
from evaluation.densevid import DenseCaptioningEvaluator, Report, format_table
from evaluation.formats import load_submission, parse_predictions
from evaluation.meteor import Meteor
from utilities.config import Config
from utilities.errors import InputError
from utilities.run_dir import RunDir


def proposal_segments(cfg: Config, results: dict, stores: dict) -> list[Segment]:
    """The first --max_prop_per_vid proposals of each val_1 video with features, as segments to caption."""
    proposals = parse_predictions(results, str(cfg.proposals))
    videos = videos_of(drop_missing(read_captions_csv(cfg.val_1_meta_path), stores, True))
    segments = []
    for video in videos:
        for p in proposals.get(video.video_id, [])[: cfg.max_prop_per_vid]:
            segments.append(
                Segment(video.video_id, "", p.start, p.end, video.duration, "val_1", len(segments))
            )
    if not segments:
        raise InputError(f"--proposals {cfg.proposals}: no proposal for any video of {cfg.val_1_meta_path}")
    return segments


def caption_proposals(cfg: Config, run: RunDir, results: dict, meteor: Meteor | None = None) -> Report:
    """Caption `results`' proposals with `--rl_pretrained_model_dir` and score them (official metrics, SODA_c)."""
    agents = load_agents(cfg, cfg.rl_pretrained_model_dir, with_value_functions=False)
    reading = Config(**{**cfg.to_dict(), "modality": MODALITY_OF_MODE[agents.agent.cfg.mode]})
    stores = open_stores(reading)
    segments = proposal_segments(cfg, results, stores)
    dataset = CaptionDataset(segments, agents.vocab, stores)
    _, loaders = caption_loaders(cfg, None, {"proposals": dataset})
    device = torch.device(cfg.device)
    agents.to(device)
    sentences = caption_segments(agents.agent, loaders["proposals"], cfg, device, "captioning proposals")
    submission = submission_of(segments, sentences)
    run.write_json("captioning_results_learned_proposals.json", submission)
    with DenseCaptioningEvaluator(
        cfg.reference_paths,
        tious=cfg.tIoUs,
        max_proposals=cfg.max_prop_per_vid,
        soda=True,
        seed=cfg.seed,
        meteor=meteor,
    ) as evaluator:
        return evaluator.evaluate(submission["results"], source="captions of the learned proposals")


def evaluate_on_proposals(cfg: Config, run: RunDir) -> None:
    """`eval --task captioning --rl_pretrained_model_dir DIR --proposals P.json`."""
    report = caption_proposals(cfg, run, load_submission(cfg.proposals))
    print(report.provenance())
    print(format_table(report))
    run.write_metrics("metrics.json", report.metrics, cfg.metrics_out)


def generate_proposals(cfg: Config, run: RunDir) -> dict:
    """`--prop_generator_model_path`'s proposals of every val_1 video with features, written to the run."""
    model, _ = load_proposal_generator(cfg.prop_generator_model_path)
    model.to(cfg.device)
    stores = open_stores(Config(**{**cfg.to_dict(), "modality": "audio_video"}))
    val = VideoDataset(videos_of(drop_missing(read_captions_csv(cfg.val_1_meta_path), stores, True)), stores)
    results = propose(model, val, cfg)
    run.write_json(f"prop_results_val_1_maxprop{cfg.max_prop_per_vid}.json", {"results": results})
    return results
