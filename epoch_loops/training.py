"""The one training machinery of both systems and the segment critic: the optimiser step, the NaN stop, the
checkpoint saver and the resume path (settings included), mixed precision (`--amp`) and `--compile`. Under
torchrun (utilities/distributed.py) `optimiser_step` averages the trained parameters' gradients over the ranks
and `Saver` writes on rank 0 only.

Every loop (captioning warm start and RL epochs, the segment critic, ranking stages 1–3) holds an
`Optimisation` and calls `optimiser_step` once per step:
  non-finite loss (on any rank)? stop → zero_grad → backward (fp16: scaled) → average the gradients over the
  ranks → clip the *global* gradient norm over every trained parameter (`--grad_clip`) → non-finite norm? stop
  (fp16: the scaler skips the step) → step → per-step schedule.
A stop (`TrainingError`) names the procedure or stage, the step, where in the data, and the run's last good
checkpoint; it happens before the step, so that checkpoint is intact.

`--resume` restores the saved run's settings (`restore_settings`): flags given explicitly may differ from the
run's only where they cannot change what is trained (`RUN_LOCAL`), or extend an epoch budget that has no
schedule tied to it (`EXTENDABLE`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from utilities import distributed
from utilities.checkpoint import load_checkpoint, restore_training_state, save_checkpoint, training_state
from utilities.config import Config
from utilities.errors import InputError, TrainingError
from utilities.run_dir import RunDir, is_rank0

log = logging.getLogger(__name__)

# A captioning checkpoint folder's training state (the weights are the agent files beside it).
TRAINING_FILE = "training_state.pt"

RUN_LOCAL = frozenset(
    {
        "device",
        "num_workers",
        "progress",
        "metrics_out",
        "critic_out",
        "exp_name",
        "log_dir",
        "resume",
        "config",
        "dry_run",
        "dist_timeout",
        "amp",
        "compile",
        "log_every",
    }
)
"""The settings a resumed run takes from its own command line, not from the checkpoint: where it runs (device,
loader workers, the process-group timeout, mixed precision and compilation: weights stay fp32 either way), what it
shows (progress bars, per-step scalars), where extra copies of its outputs go (--metrics_out, --critic_out) and
how it was started. None of them changes a trained weight or a reported number.
`--exp_name`/`--log_dir` are ignored: the run continues in the directory its checkpoint belongs to. Every other
setting is the run's; giving it explicitly with another value is an error."""

EXTENDABLE = {"train_rl_cap": "epoch_num", "train_critic": "epoch_num", "train_prop": "epoch_num"}
"""Per procedure, the epoch budget a resume may *raise*: captioning, the critic and the proposal generator train at a constant learning
rate (or one reduced on validation plateaus), so more epochs continue the same run. Ranking's linear schedule
is laid out over the total number of steps: a different --epochs_num would re-shape the learning rate of steps
already taken, so it is refused like any other setting."""


# ---- optimiser and schedule -------------------------------------------------------------------------------------


def adamw(
    groups: Iterable[tuple[nn.Module, float]], weight_decay: float, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW (eps 1e-6 as the original) with PyTorch's no-decay groups: biases, norm weights and other 1-d
    parameters get no weight decay (the original decayed LayerNorm weights). One (module, lr) per
    model: PPO's actor and critic share one optimiser with their own learning rates. `fused` None: fused where
    every parameter's device allows it."""
    param_groups = []
    for module, lr in groups:
        no_decay = {
            id(p)
            for m in module.modules()
            for name, p in m.named_parameters(recurse=False)
            if name == "bias" or p.dim() <= 1 or isinstance(m, nn.LayerNorm)
        }
        params = [p for p in module.parameters() if p.requires_grad]
        param_groups += [
            {"params": [p for p in params if id(p) not in no_decay], "lr": lr, "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in no_decay], "lr": lr, "weight_decay": 0.0},
        ]
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, eps=1e-6, fused=fused or None)


def linear_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup × total_steps` steps, then linear decay towards 0 at `total_steps`. Step t
    (0-based) uses (t+1)/W during warm-up, so the first step already learns (the original's was at lr 0)."""
    warmup_steps = round(warmup * total_steps)

    def factor(t: int) -> float:
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        return max(0.0, (total_steps - t) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- the step ---------------------------------------------------------------------------------------------------


STEP_TAG = "train"  # per-step scalars are `train/<name>` over the global optimiser step


@dataclass
class StepLog:
    """The per-step TensorBoard scalars of every training loop (`--log_every N`, 0: none): every N optimiser
    steps, the means over those N steps of the loss, the gradient norm (before clipping) and the loop's own
    statistics (reward, approx-KL, ...), the learning rate of the first parameter group and the steps per second,
    each as `train/<name>` at the global step. Values are summed on their device and read once per window, so
    logging adds no synchronisation to the other steps. Rank 0 only (`RunDir.writer` is None elsewhere)."""

    run: RunDir
    every: int
    sums: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, opt: Optimisation, values: Mapping[str, Any]) -> None:
        """Count one optimiser step with its `values` (floats or tensors); write the window at every N-th step."""
        for name, value in values.items():
            value = value.detach() if isinstance(value, Tensor) else float(value)
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1
        if opt.step % self.every == 0:
            self.write(opt)

    def write(self, opt: Optimisation) -> None:
        writer = self.run.writer
        if writer is not None:
            for name, total in self.sums.items():
                writer.add_scalar(f"{STEP_TAG}/{name}", float(total) / self.steps, opt.step)
            writer.add_scalar(f"{STEP_TAG}/lr", opt.optimizer.param_groups[0]["lr"], opt.step)
            elapsed = time.perf_counter() - self.started
            writer.add_scalar(f"{STEP_TAG}/steps_per_s", self.steps / max(elapsed, 1e-9), opt.step)
        self.sums, self.steps, self.started = {}, 0, time.perf_counter()


@dataclass
class Optimisation:
    """What `optimiser_step` works on: the optimiser over every trained parameter, the schedule stepped after
    each optimiser step (None: none, or one the loop steps itself, as captioning's plateau schedule), the
    optimiser steps done, the run whose last checkpoint a stop names (and whose TensorBoard gets the per-step
    scalars, `StepLog`), and the fp16 loss scaler (`grad_scaler`)."""

    name: str  # the procedure or stage, for messages
    optimizer: torch.optim.Optimizer
    grad_clip: float | None
    run: RunDir | None = None
    scheduler: Any = None
    step: int = 0
    scaler: torch.amp.GradScaler | None = None
    step_log: StepLog | None = None

    def __post_init__(self) -> None:
        every = self.run.log_every if self.run is not None else 0
        if every > 0 and is_rank0():
            self.step_log = StepLog(self.run, every)


# ---- mixed precision and compilation ----------------------------------------------------------------------------


def precision(amp: str | None, device: torch.device) -> str:
    """`--amp` as given, or by default bf16 on a CUDA device that supports it and none elsewhere."""
    if amp is not None:
        return amp
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"


def autocast(amp: str, device: torch.device):
    """The forward passes' context under `--amp`: torch.autocast in bf16 or fp16 (weights, optimiser state and
    checkpoints stay fp32; losses reduce in fp32), nothing for none."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs its loss scaled against gradient underflow; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def compiled(module: nn.Module, compile: bool) -> nn.Module:
    """`--compile`: the trained module's forward through torch.compile (the module itself is left as it is, so
    its weights, other methods and checkpoints are untouched)."""
    return torch.compile(module) if compile else module


def optimiser_step(
    opt: Optimisation, loss: Tensor, where: str = "", stats: Mapping[str, Any] | None = None
) -> float:
    """One optimiser step on `loss` (see the module docstring); `where` (epoch, batch, ...) goes into a stop's
    message; `stats` (the loop's own per-step values: reward, approx-KL, ...) go with the loss and gradient norm
    into the per-step scalars (`StepLog`). Returns the global gradient norm before clipping. Under torchrun every
    rank calls it once per step: the NaN check is agreed on by all ranks, and the trained parameters' gradients
    are averaged before clipping, so every rank takes the same step (a rank stepping on a stand-in sample
    contributes a zero loss)."""
    if not distributed.contributing():
        loss = loss * 0.0
    finite = bool(torch.isfinite(loss).all())
    bad = distributed.failing_ranks(not finite, loss.device)
    if bad:  # the value is this rank's, or NaN where another rank's loss stopped the step
        raise diverged(opt, "loss", math.nan if finite else float(loss.detach()), where, bad)
    opt.optimizer.zero_grad(set_to_none=True)
    (loss if opt.scaler is None else opt.scaler.scale(loss)).backward()
    trained = [p for group in opt.optimizer.param_groups for p in group["params"] if p.requires_grad]
    distributed.average_gradients(trained)
    if opt.scaler is not None:
        opt.scaler.unscale_(opt.optimizer)
    params = [p for p in trained if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, opt.grad_clip or math.inf)
    if opt.scaler is not None:  # fp16: an overflow skips the step and lowers the scale, it is no divergence
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
    elif not torch.isfinite(norm):
        raise diverged(opt, "gradient norm", float(norm), where)
    else:
        opt.optimizer.step()
    if opt.scheduler is not None:
        opt.scheduler.step()
    opt.step += 1
    if opt.step_log is not None:
        opt.step_log.add(opt, {"loss": loss.detach(), "grad_norm": norm.detach(), **(stats or {})})
    return float(norm)


def diverged(
    opt: Optimisation, what: str, value: float, where: str = "", ranks: list[int] | None = None
) -> TrainingError:
    """The NaN stop: raised before the optimiser step, so the run's last checkpoint stays good. Under torchrun
    it names the ranks it happened on (every rank raises the same stop)."""
    last = opt.run.last_checkpoint() if opt.run is not None else None
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
    place = f" ({where})" if where else ""
    on = f" on rank {', '.join(map(str, ranks))}" if ranks and distributed.world_size() > 1 else ""
    return TrainingError(
        f"{opt.name}: non-finite {what} ({value}) at optimiser step {opt.step + 1}{on}{place}: stopped before "
        f"the step; {kept}. Try a lower learning rate or --grad_clip"
    )


# ---- checkpoints ------------------------------------------------------------------------------------------------


def print_best(where: str, metric: str, checkpoint: Path | None) -> None:
    """The last line of every training run, one format for all: `best: <where>, <metric>, <checkpoint>` (e.g.
    `best: epoch 3, METEOR 10.81 (val_1), log/train_rl_cap/x/checkpoints/E_3`). Rank 0 only."""
    if is_rank0():
        print(f"best: {where}, {metric}, {checkpoint}", flush=True)


@dataclass
class Saver:
    """Every checkpoint of a run is written here: on rank 0 only, each atomically (written beside, then renamed),
    so an interruption leaves the previous file or folder of that name intact."""

    run: RunDir

    def save(self, name: str, state: dict[str, Any], *copies: str | Path) -> None:
        """`checkpoints/<name>` (and each of `copies`, e.g. --critic_out) through `save_checkpoint`."""
        if is_rank0():
            for path in (self.run.checkpoints / name, *copies):
                save_checkpoint(path, state)

    def save_folder(self, name: str, write: Callable[[Path], Any]) -> None:
        """`checkpoints/<name>/` by `write(folder)`, which writes the folder atomically itself."""
        if is_rank0():
            write(self.run.checkpoints / name)


def checkpoint_state(
    opt: Optimisation,
    cfg: Config,
    model: nn.Module | None,
    *,
    epoch: int,
    best_metric: float | None,
    **extra: Any,
) -> dict[str, Any]:
    """The training state `resume` restores: weights (unless `model` is None: saved in their own files),
    optimiser, `opt.scheduler` (or `extra["scheduler"]`), fp16's loss scale (`grad_scaler`), counters, RNG
    states, the run's config, and `extra`."""
    extra.setdefault("scheduler", opt.scheduler)
    if opt.scaler is not None:
        extra["grad_scaler"] = opt.scaler.state_dict()
    return training_state(
        model, opt.optimizer, cfg, epoch=epoch, step=opt.step, best_metric=best_metric, **extra
    )


def resume(
    opt: Optimisation,
    path: str | Path,
    model: nn.Module | None,
    *,
    kind: str | None = None,
    scheduler: Any = None,
    data_generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """The one resume path. The state is loaded on the CPU whatever the device (the RNG states must stay CPU
    tensors; weights and optimiser state are copied onto their parameters' device), its `kind` checked, then
    weights (unless `model` is None), optimiser, schedule (`opt.scheduler` unless `scheduler` is given),
    `data_generator`, fp16's loss scale (when this run and the saved one use fp16: `--amp` may change on resume)
    and the global RNGs are put back and the step count continues. Returns the state, for the loop's own
    counters."""
    source = training_file(path)
    state = load_checkpoint(source)
    if kind is not None and state.get("kind") != kind:
        raise InputError(f"--resume {path}: a {state.get('kind')} checkpoint, not {kind}")
    restore_training_state(
        state,
        model,
        opt.optimizer,
        scheduler=opt.scheduler if scheduler is None else scheduler,
        data_generator=data_generator,
        source=str(source),
    )
    if opt.scaler is not None and state.get("grad_scaler"):
        opt.scaler.load_state_dict(state["grad_scaler"])
    opt.step = state["step"]
    log.info("resuming %s from %s (%d optimiser steps done)", opt.name, source, opt.step)
    return state


def training_file(path: str | Path) -> Path:
    """`--resume` names a training-state file, or a checkpoint folder holding one (`training_state.pt`)."""
    path = Path(path)
    return path / TRAINING_FILE if path.is_dir() else path


# ---- the settings of a resumed run ------------------------------------------------------------------------------


def restore_settings(cfg: Config) -> None:
    """`--resume`: put the saved run's settings into `cfg`. A flag given explicitly with another value than the
    run's is refused unless it is `RUN_LOCAL` or raises the procedure's `EXTENDABLE` epoch budget."""
    source = training_file(cfg.resume)
    saved = load_checkpoint(source, mmap=True).get("config")
    if not isinstance(saved, dict):
        raise InputError(f"--resume {cfg.resume}: not a training checkpoint of ours (no saved settings)")
    extendable = EXTENDABLE.get(saved.get("procedure"))
    for name, value in saved.items():
        if name in RUN_LOCAL or name not in cfg.to_dict():
            continue
        given = getattr(cfg, name)
        if name in cfg.given and given != value:
            if name == extendable and given > value:
                log.info("--resume: --%s raised from %s to %s", name, value, given)
                continue
            raise InputError(
                f"--resume {cfg.resume}: --{name} {given} differs from the run's {value}; a resumed run keeps "
                "its settings (start a new run to change them)"
            )
        setattr(cfg, name, value)
