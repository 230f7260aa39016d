"""Proposals of whole videos with BMT's proposal generator, shared by `predict`, evaluation
and `--procedure train_prop`.

    python main.py --procedure train_prop --rl_pretrained_model_dir DIR (or --pretrained_cap_model_path
        best_cap_model.pt) [--finetune_cap_encoder] [--B 16 --prop_lr 5e-5 --epoch_num 100]

train_prop: anchors by 1-D k-means over the training segments' lengths (48 audio, 128 video); the encoder from
the captioning checkpoint (frozen unless --finetune_cap_encoder: its weights stay bit-identical); Adam over the
trained parameters; full batches of whole videos in a seeded order; every epoch the val_1 videos' proposals are
written (`prop_results_val_1_e<E>_maxprop<K>.json`, BMT's file format) and scored by the detection half of the
official evaluator against every `--reference_paths` file at `--tIoUs`; the epoch with the best F1 (of the mean
precision and recall) is `checkpoints/best_prop_model.pt` in BMT's layout, and `checkpoints/train_prop_last.pt`
holds the full training state for `--resume`. Features are read in the main process (one whole video per item).

Under torchrun (`torchrun --nproc_per_node=N main.py --procedure train_prop`) `--B` is the global batch: the
order comes from one seeded generator (the same on every rank, saved for `--resume`), each rank trains on its
contiguous share of every global batch, padded as the whole global batch is (`batch_rows`, one all-reduce), and
each head's means are over the global batch's cells (`proposal_loss`), so the averaged gradient is the
one-process gradient. Validation proposes for one contiguous part of the val_1 videos per rank, gathered on
rank 0, which scores them and writes every file.

Selection follows BMT's single-video tool everywhere: clip to the duration, drop proposals of 0.2 s or less,
then keep the top K by objectness (BMT's training-time validation took the top K before filtering, which returns
fewer than K whenever some are clipped away).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from datasets.captioning.activitynet import Segment, drop_missing, open_stores, read_captions_csv
from datasets.captioning.proposals import Video, VideoBatch, VideoDataset, batch_rows, videos_of
from epoch_loops.captioning.proposal_files import PROP_FILE, encoder_from_captioning, proposal_checkpoint
from epoch_loops.training import (
    Optimisation,
    Saver,
    checkpoint_state,
    optimiser_step,
    print_best,
    resume,
)
from evaluation.densevid import AVERAGE_KEY, DenseCaptioningEvaluator
from model.captioning.proposals import (
    MODALITIES,
    ProposalGenerator,
    decode,
    kmeans_anchors,
    proposal_loss,
    select_proposals,
)
from utilities import distributed
from utilities.checkpoint import load_model_state
from utilities.config import Config
from utilities.errors import InputError
from utilities.log import progress
from utilities.run_dir import RunDir, is_rank0, say
from utilities.seeding import Stream, data_generator, stream_seed


@torch.no_grad()
def video_proposals(
    model: ProposalGenerator, batch: VideoBatch, k: int, nms_tiou: float | None = None
) -> list[torch.Tensor]:
    """Per video of the batch, (≤ k, 3) rows (start, end, score) by descending score."""
    outputs = model(
        batch.features["video"], batch.masks["video"], batch.features["audio"], batch.masks["audio"]
    )
    decoded = decode(outputs, batch.n_cells)
    return [select_proposals(decoded[b], d, k, nms_tiou) for b, d in enumerate(batch.durations)]


def proposal_results(video_ids: list[str], proposals: list[torch.Tensor]) -> dict[str, list[dict]]:
    """BMT's proposal file entries: `{vid: [{"sentence": "", "proposal_score", "timestamp": [s, e]}]}`."""
    return {
        vid: [{"sentence": "", "proposal_score": p, "timestamp": [s, e]} for s, e, p in top.cpu().tolist()]
        for vid, top in zip(video_ids, proposals, strict=True)
    }


@torch.no_grad()
def propose(
    model: ProposalGenerator, dataset: VideoDataset, cfg: Config, desc: str = "proposals"
) -> dict[str, list[dict]]:
    """`--max_prop_per_vid` proposals (optional NMS) of every video of `dataset`, as a proposal file's results.
    Under torchrun each rank proposes for its contiguous part of the videos (batches of its share of
    `--inf_B_coeff × --B`) and every rank gets all of them, in file order."""
    model.eval()
    results = {}
    part = distributed.share(range(len(dataset)))
    size = -(-cfg.B * cfg.inf_B_coeff // distributed.world_size())
    for start in progress(range(0, len(part), size), desc=desc):
        batch = dataset.collate([dataset[i] for i in part[start : start + size]])
        tops = video_proposals(model, batch.to(cfg.device), cfg.max_prop_per_vid, cfg.nms_tiou_thresh)
        results.update(proposal_results(batch.video_ids, tops))
    if distributed.world_size() > 1:
        results = dict(distributed.gather(list(results.items())))
    return results


# ---- train_prop -------------------------------------------------------------------------------------------------
BEST_FILE = PROP_FILE  # the best epoch on validation F1, BMT's layout
LAST_FILE = "train_prop_last.pt"  # the full training state after the last epoch, for --resume


def centre_lengths(segments: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(start, end) → (centre, length) targets; segments of length ≤ 0 (annotation anomalies) are skipped."""
    return [((s + e) / 2, e - s) for s, e in segments if e > s]


def build_generator(cfg: Config, train_segments: list[Segment]) -> ProposalGenerator:
    """Anchors by k-means over the training segments' lengths; the encoder (sizes and weights) from the
    captioning checkpoint, frozen unless --finetune_cap_encoder."""
    for m in MODALITIES:
        even = [k for k in getattr(cfg, f"kernel_sizes_{m}") if k % 2 == 0]
        if even:
            raise InputError(
                f"--kernel_sizes_{m}: {even} are even; a head keeps the grid with odd sizes only"
            )
    lengths = np.array([s.end - s.start for s in train_segments])
    try:
        anchors = {m: kmeans_anchors(lengths, getattr(cfg, f"anchors_num_{m}")) for m in MODALITIES}
    except ValueError as e:
        raise InputError(f"--train_meta_path {cfg.train_meta_path}: {e}") from None
    sizes, encoder_state = encoder_from_captioning(cfg)
    heads = {
        f"{name}_{m}": tuple(getattr(cfg, f"{name}_{m}"))
        for name in ("kernel_sizes", "conv_layers")
        for m in MODALITIES
    }
    model = ProposalGenerator(
        replace(
            sizes,
            dout_p=cfg.dout_p,
            anchors=anchors,
            obj_coeff=cfg.obj_coeff,
            noobj_coeff=cfg.noobj_coeff,
            **heads,
        )
    )
    load_model_state(model.encoder, encoder_state, "the captioning checkpoint's encoder")
    for p in model.encoder.parameters():
        p.requires_grad = cfg.finetune_cap_encoder
    return model.to(cfg.device)


def train_epoch(
    model: ProposalGenerator,
    dataset: VideoDataset,
    opt: Optimisation,
    generator: torch.Generator,
    cfg: Config,
    epoch: int,
) -> float:
    """One pass in a seeded order of global batches, full ones only (drop_last, as the original; this rank trains
    on its share of each); returns the mean loss."""
    model.train()
    order = torch.randperm(len(dataset), generator=generator).tolist()
    batches = [order[i : i + cfg.B] for i in range(0, len(order) - cfg.B + 1, cfg.B)]
    total = torch.zeros((), dtype=torch.float64, device=cfg.device)  # on the device: NCCL reduces there
    for step, index in enumerate(progress(batches, desc=f"train_prop epoch {epoch}"), 1):
        items = [dataset[i] for i in distributed.share(index)]
        batch = dataset.collate(items, global_batch_rows(items, cfg.device)).to(cfg.device)
        outputs = model(
            batch.features["video"], batch.masks["video"], batch.features["audio"], batch.masks["audio"]
        )
        loss = proposal_loss(outputs, [centre_lengths(s) for s in batch.segments], model.cfg)
        optimiser_step(opt, loss, f"epoch {epoch}, batch {step}")
        total += loss.detach()  # the ranks' losses average to the global batch's
    return float(distributed.global_sum(total)) / distributed.world_size() / max(1, len(batches))


def global_batch_rows(items: list[tuple[Video, dict]], device) -> dict[str, int]:
    """The rows per modality that the whole global batch pads to: the largest over the ranks' shares."""
    rows = batch_rows([r for _, r in items])
    largest = distributed.global_max(torch.tensor(list(rows.values()), device=device)).tolist()
    return dict(zip(rows, largest, strict=True))


def train_prop(cfg: Config, run: RunDir) -> None:
    if cfg.modality != "audio_video":
        raise InputError(
            f"train_prop: --modality {cfg.modality}: the proposal generator is bimodal (audio_video)"
        )
    stores = open_stores(cfg)
    train_annotations = read_captions_csv(cfg.train_meta_path)
    train = VideoDataset(
        videos_of(drop_missing(train_annotations, stores, cfg.skip_missing_features)), stores
    )
    val = VideoDataset(videos_of(drop_missing(read_captions_csv(cfg.val_1_meta_path), stores, True)), stores)
    if len(train) < cfg.B:
        raise InputError(
            f"--train_meta_path {cfg.train_meta_path}: {len(train)} videos, fewer than --B {cfg.B}"
        )
    distributed.check_global_batch("B", cfg.B)
    model = build_generator(cfg, train_annotations.segments)
    trained = [p for p in model.parameters() if p.requires_grad]
    say(
        f"train_prop: {len(train)} training videos, {len(val)} validation videos ({cfg.val_1_meta_path}); "
        f"parameters {sum(p.numel() for p in model.parameters())}, trained {sum(p.numel() for p in trained)} "
        f"(encoder {'fine-tuned' if cfg.finetune_cap_encoder else 'frozen'})"
    )
    if cfg.dry_run:
        return
    opt = Optimisation(cfg.procedure, torch.optim.Adam(trained, lr=cfg.prop_lr), cfg.grad_clip, run)
    generator = data_generator(stream_seed(Stream.SHUFFLE, cfg.seed))
    metrics: dict = {"epochs": [], "best": None}
    start_epoch = 0
    if cfg.resume:
        state = resume(opt, cfg.resume, model, data_generator=generator)
        start_epoch, metrics = state["epoch"], state["metrics"]
    saver = Saver(run)
    with DenseCaptioningEvaluator(
        cfg.reference_paths, cfg.tIoUs, cfg.max_prop_per_vid, seed=cfg.seed, detection_only=True
    ) as evaluator:
        for epoch in range(start_epoch + 1, cfg.epoch_num + 1):
            train_loss = train_epoch(model, train, opt, generator, cfg, epoch)
            results = propose(model, val, cfg, desc=f"validation epoch {epoch}")
            detection = None
            if is_rank0():
                run.write_json(
                    f"prop_results_val_1_e{epoch}_maxprop{cfg.max_prop_per_vid}.json", {"results": results}
                )
                detection = evaluator.detection(results, source=f"epoch {epoch} proposals")
            detection = distributed.from_rank0(detection)  # selection and early stopping on every rank
            f1 = detection[AVERAGE_KEY]["F1"]
            record = {"epoch": epoch, "train_loss": train_loss, "val_1": detection}
            improved = metrics["best"] is None or f1 > metrics["best"]["val_1"][AVERAGE_KEY]["F1"]
            metrics["epochs"].append(record)
            if improved:
                metrics["best"] = record
                saver.save(
                    BEST_FILE,
                    proposal_checkpoint(model, epoch, opt.optimizer, detection, f1, **run_config(cfg)),
                )
            if is_rank0():
                report_epoch(run, record, improved)
                run.write_metrics("metrics.json", metrics, cfg.metrics_out)
            best_f1 = metrics["best"]["val_1"][AVERAGE_KEY]["F1"]
            saver.save(
                LAST_FILE,
                checkpoint_state(
                    opt,
                    cfg,
                    model,
                    epoch=epoch,
                    best_metric=best_f1,
                    data_generator=generator,
                    metrics=metrics,
                ),
            )
            distributed.barrier()  # the epoch's checkpoints are complete before any rank goes on
            stale = epoch - metrics["best"]["epoch"]
            if stale >= cfg.early_stop_after:
                say(
                    f"no F1 improvement for {stale} epochs: stopping (--early_stop_after {cfg.early_stop_after})"
                )
                break
    best = metrics["best"]["val_1"][AVERAGE_KEY]
    say(
        f"best epoch {metrics['best']['epoch']}: P {best['Precision']:.4f} R {best['Recall']:.4f} "
        f"F1 {best['F1']:.4f}"
    )
    print_best(
        f"epoch {metrics['best']['epoch']}",
        f"F1 {best['F1']:.4f} (val_1 proposals)",
        run.path / "checkpoints" / BEST_FILE,
    )


def run_config(cfg: Config) -> dict:
    """What the original's config records about the run, beside the generator's sizes."""
    return {
        "procedure": "train_prop",
        "train_meta_path": cfg.train_meta_path,
        "val_1_meta_path": cfg.val_1_meta_path,
        "finetune_cap_encoder": cfg.finetune_cap_encoder,
        "train_batch_size": cfg.B,
        "lr": cfg.prop_lr,
        "max_prop_per_vid": cfg.max_prop_per_vid,
        "nms_tiou_thresh": cfg.nms_tiou_thresh,
        "tIoUs": list(cfg.tIoUs),
        "reference_paths": list(cfg.reference_paths),
    }


def report_epoch(run: RunDir, record: dict, improved: bool) -> None:
    avg = record["val_1"][AVERAGE_KEY]
    print(
        f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} | val_1 proposals P {avg['Precision']:.4f} "
        f"R {avg['Recall']:.4f} F1 {avg['F1']:.4f}{' (best)' if improved else ''}"
    )
    if run.writer is not None:
        run.writer.add_scalar("train_prop/loss", record["train_loss"], record["epoch"])
        for key in ("Precision", "Recall", "F1"):
            run.writer.add_scalar(f"train_prop/val_1_{key}", avg[key], record["epoch"])


def uniform_proposals(videos: list[Video], lengths: list[float], k: int) -> dict[str, list[dict]]:
    """A baseline that looks at nothing but the duration: a grid of k windows per video, m = ⌈√k⌉ window
    lengths (the anchor `lengths` at evenly spaced ranks) × ⌈k/m⌉ evenly spaced centres ((i + ½)·D/n), clipped
    to the video; positions vary fastest, and all scores are 1 (file order is the ranking)."""
    ranked = sorted(lengths)
    m = min(len(ranked), math.ceil(math.sqrt(k)))
    chosen = [ranked[int((j + 0.5) * len(ranked) / m)] for j in range(m)]
    n = math.ceil(k / m)
    results = {}
    for video in videos:
        D = video.duration
        windows = []
        for length in chosen:
            for i in range(n):
                centre = (i + 0.5) * D / n
                start, end = max(centre - length / 2, 0.0), min(centre + length / 2, D)
                windows.append({"sentence": "", "proposal_score": 1.0, "timestamp": [start, end]})
        results[video.video_id] = windows[:k]
    return results
