"""`main.py --procedure demo`: the framework end to end on its built-in demo data.

It generates the demo dataset (the real on-disk formats), reads it through the same data pipeline as real
ActivityNet Captions, captions every ground-truth segment of val_1 and val_2 with a nearest-neighbour retrieval
baseline (the caption of the train segment whose pooled video+audio features are closest), and scores the
predictions with the official dense-captioning evaluator (ground-truth proposals: tIoU 0.5, one reference file
per split, the BMT protocol). A most-frequent-caption baseline is scored beside it: the gap between the two shows
that the features carry the captions' content. This stands in until the captioning procedures land.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F

from datasets.activitynet import (
    CaptionDataset,
    build_caption_dataset,
    open_stores,
    read_captions_csv,
)
from datasets.demo import ensure_demo_dataset
from datasets.loader import val_loader
from datasets.vocabulary import vocabulary_from_config
from epoch_loops.evaluate import format_table
from epoch_loops.ranking_demo import ranking_demo
from evaluation.densevid import DenseCaptioningEvaluator
from evaluation.meteor import Meteor
from utilities.config import Config
from utilities.log import progress
from utilities.run_dir import RunDir

log = logging.getLogger(__name__)
SPLITS = ("val_1", "val_2")


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
    print(f"vocabulary size: {len(vocab.itos)}")
    print("trainable parameters: 0 (retrieval baseline)")
    if cfg.dry_run:
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
                submission = submission_of(dataset, sentences)
                run.write_json(f"captioning_results_{split}_{name}.json", submission)
                report = evaluator.evaluate(submission["results"], source=f"{name} on {split}")
                metrics[f"{split}/{name}"] = report.metrics["0.5"]
                print(f"\n{name} baseline on {split} ({report.provenance()})")
                print(format_table(report))
    for name in ("nearest_neighbour", "most_frequent"):
        mean_meteor = sum(metrics[f"{s}/{name}"]["METEOR"] for s in SPLITS) / len(SPLITS)
        metrics[f"mean/{name}"] = {"METEOR": mean_meteor}
        if run.writer is not None:
            run.writer.add_scalar(f"demo/{name}_meteor", 100 * mean_meteor)
    metrics.update(ranking_demo(cfg, run))
    run.write_metrics("metrics.json", metrics, cfg.metrics_out)
    print(
        f"\nMETEOR ×100, mean of val_1 and val_2: nearest neighbour {100 * metrics['mean/nearest_neighbour']['METEOR']:.2f}"
        f" vs most frequent caption {100 * metrics['mean/most_frequent']['METEOR']:.2f}  (run: {run.path})"
    )


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


def submission_of(dataset: CaptionDataset, sentences: list[str]) -> dict:
    """The official submission format, segments in file order with their exact CSV timestamps."""
    results: dict[str, list[dict]] = {}
    for segment, sentence in zip(dataset.segments, sentences, strict=True):
        results.setdefault(segment.video_id, []).append(
            {"sentence": sentence, "timestamp": [segment.start, segment.end]}
        )
    return {"version": "VERSION 1.0", "external_data": {"used": False, "details": ""}, "results": results}
