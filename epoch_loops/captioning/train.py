"""`main.py --procedure train_rl_cap`: train the BMHRL agent (or an ablation) and validate it 1-by-1.

The whole run, top-down (`fit`):
  for each epoch: its phase (`epoch_phase`: exactly --rl_warmstart_epochs warm-start epochs, then the RL
  phases) → the phase's epoch function (`epoch_function`; the RL objectives plug in there) → from
  --one_by_one_starts_at on, 1-by-1 validation on the ground-truth segments of val_1 and val_2 (greedy or beam
  decoding, each split scored at tIoU 0.5 against its own reference) → selection on --select_on with early
  stopping → `checkpoints/last/` every epoch (for --resume) and `checkpoints/E_<epoch>/` when the selection
  metric improves.

An epoch function is `fn(trainer, epoch) -> {stat: value}`: it trains for one epoch and returns per-epoch means
to log; it writes no files. Files, TensorBoard and the console are written in one place (`record_epoch`), on rank
0 only. Losses are divided by `utilities.distributed.loss_normaliser`, so the gradient is the same for the same
global batch on one process or under DDP.

`--mode eval` (and `--procedure eval --task captioning --rl_pretrained_model_dir DIR`) validates a checkpoint.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datasets.captioning.activitynet import (
    CaptionBatch,
    CaptionDataset,
    Segment,
    build_caption_dataset,
    open_stores,
    read_captions_csv,
)
from datasets.loader import CaptionLoader, caption_loaders
from datasets.vocabulary import Vocabulary, vocabulary_from_config
from epoch_loops.captioning import rl
from epoch_loops.captioning.agent_files import (
    TRAINING_FILE,
    Agents,
    is_checkpoint_folder,
    load_agents,
    new_agents,
    save_agents,
)
from epoch_loops.training import (
    Optimisation,
    Saver,
    autocast,
    checkpoint_state,
    compiled,
    grad_scaler,
    optimiser_step,
    precision,
    print_best,
    resume,
)
from evaluation.densevid import DenseCaptioningEvaluator, Report, format_table
from evaluation.meteor import Meteor
from model.captioning.bmhrl import BMHRLAgent, trainable_parameters
from model.captioning.decoding import beam_search, greedy_decode
from model.captioning.losses import label_smoothing_loss
from utilities import distributed
from utilities.config import Config
from utilities.distributed import global_sum, loss_normaliser
from utilities.errors import InputError
from utilities.log import progress
from utilities.run_dir import RunDir, is_rank0

log = logging.getLogger(__name__)

SPLITS = ("val_1", "val_2")
GT_TIOU = 0.5  # ground-truth segments: one threshold, as BMT and BMHRL validate
MODALITY_OF_MODE = {"BMHRL": "audio_video", "BM": "audio_video", "AHRL": "audio", "VHRL": "video"}


# ---- the procedure --------------------------------------------------------------------------------------------


def train_rl_cap(cfg: Config, run: RunDir) -> None:
    if cfg.mode == "eval":
        validate_checkpoint(cfg, run)
    else:
        train(cfg, run)


def train(cfg: Config, run: RunDir, meteor: Meteor | None = None) -> TrainState | None:
    """Train from scratch, from --rl_pretrained_model_dir, or --resume a run; None for a dry run. `meteor`: a
    METEOR process to share (the demo's); by default the run starts its own."""
    resume = resume_folder(cfg.resume) if cfg.resume else None
    source = resume or cfg.rl_pretrained_model_dir
    if source:
        agents = load_agents(cfg, source)
        if agents.agent.cfg.mode != cfg.mode:
            raise InputError(f"{source} holds a {agents.agent.cfg.mode} agent but --mode is {cfg.mode}")
    else:
        captions = [s.caption for s in read_captions_csv(cfg.train_meta_path).segments]
        agents = new_agents(cfg, vocabulary_from_config(cfg, captions), load_weights=not cfg.dry_run)
    agents.agent.set_phase("warm_start")
    distributed.check_global_batch("B", cfg.B)
    if is_rank0():
        print(f"trainable parameters: {trainable_parameters(agents.agent)}")
        print(f"vocabulary size: {len(agents.vocab)}")
    plan = [epoch_phase(cfg, e) for e in range(cfg.epoch_num)]
    for phase in dict.fromkeys(plan):
        epoch_function(cfg, phase)  # an unavailable phase fails here, before any work
    if cfg.dry_run:
        if is_rank0():
            print(f"epochs: {', '.join(f'{p} x{plan.count(p)}' for p in dict.fromkeys(plan))}")
        return None

    datasets = caption_datasets(cfg, agents.vocab, agents.agent.cfg.mode, with_train=True)
    train_batches, val_batches = caption_loaders(cfg, datasets["train"], {s: datasets[s] for s in SPLITS})
    with ExitStack() as stack:
        if meteor is None:
            meteor = stack.enter_context(Meteor())
        validation = Validation(cfg, {s: datasets[s] for s in SPLITS}, val_batches, meteor)
        trainer = Trainer.create(cfg, agents, train_batches, meteor, run)
        state = restore(trainer, resume) if resume else TrainState()
        state = fit(trainer, validation, run, state)
    if state.best_epoch is None:
        print_best(
            f"no epoch validated (--one_by_one_starts_at {cfg.one_by_one_starts_at})",
            "no METEOR",
            run.last_checkpoint(),
        )
    else:
        print_best(
            f"epoch {state.best_epoch}",
            f"METEOR {100 * state.best_metric:.2f} ({cfg.select_on})",
            run.path / "checkpoints" / f"E_{state.best_epoch}",
        )
    return state


def resume_folder(path: str) -> Path:
    """`--resume` names a checkpoint folder (`checkpoints/last`, `checkpoints/E_<n>`) or its training_state.pt."""
    folder = Path(path)
    if folder.name == TRAINING_FILE:
        folder = folder.parent
    if not (is_checkpoint_folder(folder) and (folder / TRAINING_FILE).is_file()):
        raise InputError(
            f"--resume {path}: not a training checkpoint folder (expected {TRAINING_FILE} and the agent files; "
            "e.g. log/train_rl_cap/<exp>/checkpoints/last)"
        )
    return folder


def caption_datasets(
    cfg: Config, vocab: Vocabulary, mode: str, with_train: bool
) -> dict[str, CaptionDataset]:
    """val_1, val_2 (and train) with the features the agent's mode reads (`--mode AHRL`: audio only, ...)."""
    reading = Config(**{**cfg.to_dict(), "modality": MODALITY_OF_MODE[mode]})
    stores = open_stores(reading)
    splits = ("train", *SPLITS) if with_train else SPLITS
    return {
        split: build_caption_dataset(reading, getattr(cfg, f"{split}_meta_path"), vocab, stores)
        for split in splits
    }


# ---- the trainer ----------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """What an epoch function works with. The optimiser (`optimisation`, stepped by the shared
    `optimiser_step`) is one Adam with one parameter group per trained module group
    (`BMHRLAgent.module_groups`: 'worker', 'manager'; plus 'worker_value_function', 'manager_value_function'),
    each named by its "name" key; a frozen group's parameters get no gradient (grads are set to None), so Adam
    leaves them, and their moments, alone. `scheduler` is the plateau schedule the loop steps on validation."""

    cfg: Config
    agents: Agents
    optimisation: Optimisation
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None
    train_batches: CaptionLoader
    device: torch.device
    meteor: Meteor  # the run's one METEOR process (validation; RL rewards)
    amp: str = "none"  # --amp as resolved for the device
    forward: torch.nn.Module | None = None  # the agent's forward, compiled with --compile (else the agent)
    rewards: Any = None  # the RL reward and tokenised references (epoch_loops.captioning.rl), built at the first RL epoch

    @classmethod
    def create(
        cls,
        cfg: Config,
        agents: Agents,
        train_batches: CaptionLoader,
        meteor: Meteor,
        run: RunDir | None = None,
    ) -> Trainer:
        device = torch.device(cfg.device)
        agents.to(device)
        agent_lr = cfg.rl_cap_warmstart_lr if cfg.rl_warmstart_epochs > 0 else cfg.rl_cap_lr
        groups = [
            {"name": name, "params": _parameters(modules), "lr": agent_lr, "weight_decay": cfg.weight_decay}
            for name, modules in agents.agent.module_groups().items()
        ]
        for name, module in (
            ("worker_value_function", agents.worker_value),
            ("manager_value_function", agents.manager_value),
        ):
            groups.append({"name": name, "params": list(module.parameters()), "lr": cfg.rl_value_function_lr})
        optimizer = torch.optim.Adam(groups)
        scheduler = None
        if cfg.scheduler == "reduce_on_plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=cfg.lr_reduce_factor, patience=cfg.lr_patience
            )
        amp = precision(cfg.amp, device)
        optimisation = Optimisation(
            cfg.procedure, optimizer, cfg.grad_clip, run, scaler=grad_scaler(amp, device)
        )
        forward = compiled(agents.agent, cfg.compile)
        return cls(cfg, agents, optimisation, scheduler, train_batches, device, meteor, amp, forward)

    def autocast(self):
        """The context of the training forward passes under --amp."""
        return autocast(self.amp, self.device)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimisation.optimizer

    def group(self, name: str) -> dict:
        return next(g for g in self.optimizer.param_groups if g["name"] == name)

    def agent_lr(self) -> float:
        return self.group("worker")["lr"]

    def optimiser_step(
        self,
        loss: torch.Tensor,
        epoch: int,
        batch_index: int,
        batch: CaptionBatch | None,
        stats: dict[str, Any] | None = None,
    ) -> float:
        """`optimiser_step` over the agent and both value functions; a stop names the epoch, batch and videos;
        `stats` go into the per-step scalars."""
        return optimiser_step(self.optimisation, loss, self.place(epoch, batch_index, batch), stats)

    @staticmethod
    def place(epoch: int, batch_index: int, batch: CaptionBatch | None) -> str:
        """Where a step is, for a stop's message: epoch, batch and its first videos."""
        videos = "" if batch is None else f"; videos {', '.join(dict.fromkeys(batch.video_ids[:3]))}, ..."
        return f"epoch {epoch}, batch {batch_index}{videos}"


def _parameters(modules: Sequence[torch.nn.Module]) -> list[torch.nn.Parameter]:
    seen: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


# ---- the epoch plan: where the RL phases plug in ---------------------------------------------------------------


def epoch_phase(cfg: Config, epoch: int) -> str:
    """'warm_start' for exactly the first --rl_warmstart_epochs epochs, then one RL epoch per module: 'worker'
    and 'manager' alternate, starting with the worker unless --no-rl_train_worker. The BM ablation has no manager:
    all its RL epochs train the worker."""
    if epoch < cfg.rl_warmstart_epochs:
        return "warm_start"
    if cfg.mode == "BM":
        return "worker"
    order = ("worker", "manager") if cfg.rl_train_worker else ("manager", "worker")
    return order[(epoch - cfg.rl_warmstart_epochs) % 2]


EpochFunction = Callable[[Trainer, int], dict[str, float]]


def epoch_function(cfg: Config, phase: str) -> EpochFunction:
    """The function that trains one epoch of `phase`; a bad RL setting fails here, before any work."""
    if phase == "warm_start":
        return warm_start_epoch
    rl.check_settings(cfg)
    return functools.partial(rl.rl_epoch, module=phase)


# ---- training state -------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """The loop's counters; with the trainer's weights, optimiser and RNGs, what `--resume` restores."""

    epoch: int = 0  # the next epoch to run
    best_metric: float | None = None
    best_epoch: int | None = None
    stale: int = 0  # validations since the last improvement
    history: list[dict[str, Any]] = field(default_factory=list)


def training_state(trainer: Trainer, state: TrainState) -> dict[str, Any]:
    """`training_state.pt` of a checkpoint folder (the weights are the folder's agent files)."""
    return checkpoint_state(
        trainer.optimisation,
        trainer.cfg,
        None,
        epoch=state.epoch,
        best_metric=state.best_metric,
        scheduler=trainer.scheduler,
        best_epoch=state.best_epoch,
        stale=state.stale,
        history=state.history,
        agent_rng=trainer.agents.agent.rng.get_state(),
    )


def restore(trainer: Trainer, folder: Path) -> TrainState:
    """Put a checkpoint's optimiser, scheduler, counters and RNG states back (its weights are loaded already)."""
    saved = resume(trainer.optimisation, folder, None, scheduler=trainer.scheduler)
    trainer.agents.agent.rng.set_state(saved["agent_rng"])
    return TrainState(
        saved["epoch"], saved["best_metric"], saved["best_epoch"], saved["stale"], saved["history"]
    )


# ---- the loop -------------------------------------------------------------------------------------------------


def fit(trainer: Trainer, validation: Validation, run: RunDir, state: TrainState) -> TrainState:
    cfg = trainer.cfg
    if is_rank0() and run.writer is not None and state.epoch == 0:
        run.writer.add_scalar("debug/param_number", trainable_parameters(trainer.agents.agent), 0)
    while state.epoch < cfg.epoch_num:
        epoch = state.epoch
        if state.stale >= cfg.early_stop_after:
            log.info(
                "early stop: %d validations without improvement of %s METEOR", state.stale, cfg.select_on
            )
            break
        phase = epoch_phase(cfg, epoch)
        if phase != "warm_start" and epoch == cfg.rl_warmstart_epochs:
            for name in trainer.agents.agent.module_groups():
                trainer.group(name)["lr"] = cfg.rl_cap_lr
        started = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch, "phase": phase, "lr": trainer.agent_lr()}
        record["train"] = epoch_function(cfg, phase)(trainer, epoch)
        improved = False
        submissions: dict[str, dict] = {}
        if epoch >= cfg.one_by_one_starts_at:
            record["val"], submissions, _ = validation.run(trainer.agents.agent, trainer.device, f"e{epoch}")
            score = record["val"][cfg.select_on]["METEOR"]
            improved = state.best_metric is None or score > state.best_metric
            if improved:
                state.best_metric, state.best_epoch, state.stale = score, epoch, 0
            else:
                state.stale += 1
            if trainer.scheduler is not None:
                trainer.scheduler.step(score)
        record["seconds"] = round(time.perf_counter() - started, 2)
        state.history.append(record)
        state.epoch = epoch + 1
        if is_rank0():
            samples = validation.samples if "val" in record else {}
            record_epoch(trainer, state, run, record, submissions, improved, samples)
        distributed.barrier()  # the epoch's checkpoint is complete before any rank goes on
    return state


def record_epoch(
    trainer: Trainer,
    state: TrainState,
    run: RunDir,
    record: dict,
    submissions: dict,
    improved: bool,
    samples: dict[str, str],
) -> None:
    """Every side effect of an epoch: prediction files, checkpoints, metrics.json, TensorBoard (with the
    validation's `samples` of captions), the console."""
    cfg, epoch = trainer.cfg, record["epoch"]
    for name, submission in submissions.items():
        run.write_json(name, submission)
    training, saver = training_state(trainer, state), Saver(run)
    saver.save_folder("last", lambda folder: save_agents(folder, trainer.agents, training))
    if improved:
        saver.save_folder(f"E_{epoch}", lambda folder: save_agents(folder, trainer.agents, training))
    run.write_metrics("metrics.json", metrics_summary(cfg, state), cfg.metrics_out)
    writer = run.writer
    if writer is not None:
        writer.add_scalar("epoch/lr", record["lr"], epoch)
        for key, value in record["train"].items():
            writer.add_scalar(f"epoch/{key}", value, epoch)
        for split, metrics in record.get("val", {}).items():
            for name, value in metrics.items():
                writer.add_scalar(f"{split}/{name}", 100 * value, epoch)
        for split, text in samples.items():
            writer.add_text(f"{split}/captions", text, epoch)
        writer.flush()
    train = ", ".join(f"{k} {v:.4g}" for k, v in record["train"].items())
    line = f"epoch {epoch} {record['phase']}: {train}, lr {record['lr']:.3g}"
    if "val" in record:
        val = " ".join(f"{s} {100 * record['val'][s]['METEOR']:.2f}" for s in (*SPLITS, "mean"))
        line += (
            f" | METEOR {val} | best {cfg.select_on} {100 * state.best_metric:.2f} (epoch {state.best_epoch})"
        )
    print(f"{line} [{record['seconds']:.0f} s]", flush=True)


def metrics_summary(cfg: Config, state: TrainState) -> dict[str, Any]:
    best = next((r for r in state.history if r["epoch"] == state.best_epoch), None)
    return {
        "select_on": cfg.select_on,
        "best_epoch": state.best_epoch,
        "best": None if best is None else best["val"],
        "history": state.history,
    }


# ---- the warm start -------------------------------------------------------------------------------------------


def warm_start_epoch(trainer: Trainer, epoch: int) -> dict[str, float]:
    """One epoch of teacher-forced label smoothing (--smoothing) over the whole agent; the value functions are
    not trained (they need rewards). Returns the token-weighted mean loss and the mean gradient norm."""
    agent = trainer.agents.agent
    agent.train()
    agent.set_phase("warm_start")
    trainer.train_batches.sampler.set_epoch(epoch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=trainer.device)
    tokens = torch.zeros((), dtype=torch.float64, device=trainer.device)
    grad_norms = []
    for i, batch in enumerate(
        progress(trainer.train_batches, desc=f"epoch {epoch} warm start", unit="batch")
    ):
        batch = batch.to(trainer.device, non_blocking=True)
        with distributed.stand_in(batch.stand_in):
            with trainer.autocast():
                loss, normaliser = warm_start_loss(trainer.forward, batch, trainer.cfg.smoothing)
            grad_norms.append(trainer.optimiser_step(loss, epoch, i, batch))
        loss_sum += loss.detach().double() * normaliser * (not batch.stand_in)
        tokens += normaliser
    return {
        "loss": float(global_sum(loss_sum) / global_sum(tokens)),
        "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
    }


def warm_start_loss(
    agent: BMHRLAgent, batch: CaptionBatch, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's label-smoothing loss (decoder input `captions[:, :-1]`, target `captions[:, 1:]`) and its
    normaliser (the global number of target tokens / world size); `agent` may be its compiled forward. The loss
    reduces in fp32 whatever the autocast precision."""
    targets = batch.captions[:, 1:]
    normaliser = loss_normaliser((targets != agent.pad_idx).sum())
    out = agent(batch.video, batch.video_mask, batch.audio, batch.audio_mask, batch.captions[:, :-1])
    loss = label_smoothing_loss(
        out.log_probs.float(), targets, agent.pad_idx, smoothing, normalizer=normaliser
    )
    return loss, normaliser


# ---- 1-by-1 validation ----------------------------------------------------------------------------------------


class Validation:
    """Captions for every ground-truth segment of val_1 and val_2 (file order), each split scored at tIoU 0.5
    against its own reference (`--reference_paths`: val_1's, then val_2's), plus the mean of the two (BMT's
    protocol). One METEOR process serves every split and epoch. Under torchrun each rank captions its own part
    of a split (the loaders cut it, without padding), rank 0 gathers the captions in file order, scores them and
    hands the metrics to every rank (they steer selection and early stopping everywhere)."""

    def __init__(
        self,
        cfg: Config,
        datasets: dict[str, CaptionDataset],
        loaders: dict[str, CaptionLoader],
        meteor: Meteor,
    ):
        if len(cfg.reference_paths) != len(SPLITS):
            raise InputError(
                f"--reference_paths: expected {len(SPLITS)} files (val_1's, then val_2's), got {len(cfg.reference_paths)}"
            )
        self.cfg, self.datasets, self.loaders = cfg, datasets, loaders
        self.samples: dict[str, str] = {}  # split → the last run's first captions, for TensorBoard (rank 0)
        self.evaluators = {
            split: DenseCaptioningEvaluator(
                [reference], tious=[GT_TIOU], max_proposals=cfg.max_prop_per_vid, seed=cfg.seed, meteor=meteor
            )
            for split, reference in zip(SPLITS, cfg.reference_paths, strict=True)
        }

    def run(
        self, agent: BMHRLAgent, device: torch.device, tag: str
    ) -> tuple[dict[str, dict[str, float]], dict[str, dict], dict[str, Report]]:
        """Metrics per split and their mean (fractions), the submissions by file name, the reports (the last two
        on rank 0 only)."""
        metrics, submissions, reports = {}, {}, {}
        for split, dataset in self.datasets.items():
            sentences = caption_segments(agent, self.loaders[split], self.cfg, device, f"{split} {tag}")
            sentences = distributed.gather(sentences)
            if not is_rank0():
                continue
            submission = submission_of(dataset.segments, sentences)
            submissions[f"captioning_results_{split}_{tag}.json"] = submission
            self.samples[split] = caption_samples(dataset.segments, sentences)
            reports[split] = self.evaluators[split].evaluate(submission["results"], source=f"{split} {tag}")
            metrics[split] = reports[split].metrics[str(GT_TIOU)]
        if is_rank0():
            metrics["mean"] = {
                m: sum(metrics[s][m] for s in SPLITS) / len(SPLITS) for m in metrics[SPLITS[0]]
            }
        return distributed.from_rank0(metrics), submissions, reports


@torch.no_grad()
def caption_segments(
    agent: BMHRLAgent, loader: CaptionLoader, cfg: Config, device: torch.device, desc: str
) -> list[str]:
    """One caption per segment of the loader, in its order (greedy, or beam search with --beam_size > 1)."""
    agent.eval()
    vocab = loader.dataset.vocab
    sentences = []
    for batch in progress(loader, desc=desc, unit="batch"):
        batch = batch.to(device, non_blocking=True)
        tokens = decode(agent, batch.video, batch.video_mask, batch.audio, batch.audio_mask, cfg)
        sentences += [caption_text(row, vocab) for row in tokens.tolist()]
    return sentences


def decode(agent: BMHRLAgent, video, video_mask, audio, audio_mask, cfg: Config) -> torch.Tensor:
    if cfg.beam_size > 1:
        return beam_search(
            agent, video, video_mask, audio, audio_mask, cfg.beam_size, cfg.max_len, cfg.length_penalty
        )
    return greedy_decode(agent, video, video_mask, audio, audio_mask, cfg.max_len)


def caption_text(ids: Sequence[int], vocab: Vocabulary) -> str:
    """Words up to the first end token, special tokens left out, joined by single spaces, then
    `str.capitalize()` (the original's post-processing, except that it kept specials before the end token)."""
    words = []
    for i in ids:
        if i == vocab.end_idx:
            break
        if i not in (vocab.unk_idx, vocab.pad_idx, vocab.start_idx):
            words.append(vocab.itos[i])
    return " ".join(words).capitalize()


SAMPLE_SEGMENTS = 3  # validation segments whose captions TensorBoard shows every validated epoch


def caption_samples(segments: Sequence[Segment], sentences: Sequence[str]) -> str:
    """The first `SAMPLE_SEGMENTS` segments of a split (file order: the same ones every epoch), predicted
    caption beside the reference, as TensorBoard text (markdown)."""
    return "\n\n".join(
        f"**{s.video_id} [{s.start:.1f}, {s.end:.1f}]**: predicted: {sentence} | reference: {s.caption}"
        for s, sentence in zip(segments[:SAMPLE_SEGMENTS], sentences[:SAMPLE_SEGMENTS], strict=True)
    )


def submission_of(segments: Sequence[Segment], sentences: Sequence[str]) -> dict:
    """The official submission format, segments in file order with their exact CSV timestamps."""
    results: dict[str, list[dict]] = {}
    for segment, sentence in zip(segments, sentences, strict=True):
        results.setdefault(segment.video_id, []).append(
            {"sentence": sentence, "timestamp": [segment.start, segment.end]}
        )
    return {"version": "VERSION 1.0", "external_data": {"used": False, "details": ""}, "results": results}


# ---- validating a checkpoint ----------------------------------------------------------------------------------


def validate_checkpoint(cfg: Config, run: RunDir) -> dict[str, dict[str, float]]:
    """Validate `--rl_pretrained_model_dir` 1-by-1 on val_1 and val_2; print the tables, write the prediction
    files and metrics.json (and --metrics_out)."""
    if not cfg.rl_pretrained_model_dir:
        raise InputError("validating a checkpoint needs --rl_pretrained_model_dir DIR")
    agents = load_agents(cfg, cfg.rl_pretrained_model_dir, with_value_functions=False)
    datasets = caption_datasets(cfg, agents.vocab, agents.agent.cfg.mode, with_train=False)
    _, loaders = caption_loaders(cfg, None, datasets)
    device = torch.device(cfg.device)
    agents.to(device)
    with Meteor() as meteor:
        metrics, submissions, reports = Validation(cfg, datasets, loaders, meteor).run(
            agents.agent, device, "eval"
        )
    if not is_rank0():
        return metrics
    for name, submission in submissions.items():
        run.write_json(name, submission)
    for split, report in reports.items():
        print(f"\n{split} ({report.provenance()})")
        print(format_table(report))
    print("\nMETEOR ×100: " + ", ".join(f"{s} {100 * metrics[s]['METEOR']:.4f}" for s in (*SPLITS, "mean")))
    run.write_metrics("metrics.json", metrics, cfg.metrics_out)
    return metrics


def validate_checkpoint_procedure(cfg: Config, run: RunDir) -> None:
    """`--procedure eval --task captioning --rl_pretrained_model_dir DIR`: eval is registered torch-free (for
    scoring submission files), so the device and torch's seed are set up here."""
    from epoch_loops.procedures import resolve_device
    from utilities.seeding import seed_everything

    cfg.device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    validate_checkpoint(cfg, run)
