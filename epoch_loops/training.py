"""The training machinery every captioning epoch function shares: the `Trainer` (agent, value functions, one
Adam with a named parameter group per trained module group) and the optimiser step with its non-finite stop.
The warm start (epoch_loops/captioning/train.py) and the RL epochs (epoch_loops/captioning/rl.py) both step through here."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from datasets.captioning.activitynet import CaptionBatch
from datasets.loader import CaptionLoader
from epoch_loops.captioning.agent_files import Agents
from evaluation.meteor import Meteor
from utilities.config import Config
from utilities.errors import InputError


@dataclass
class Trainer:
    """What an epoch function works with. The optimiser has one parameter group per trained module group
    (`BMHRLAgent.module_groups`: 'worker', 'manager'; plus 'worker_value_function', 'manager_value_function'),
    each named by its "name" key; a frozen group's parameters get no gradient (grads are set to None), so Adam
    leaves them, and their moments, alone."""

    cfg: Config
    agents: Agents
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None
    train_batches: CaptionLoader
    device: torch.device
    meteor: Meteor  # the run's one METEOR process (validation; RL rewards)
    step: int = 0  # optimiser steps done
    last_checkpoint: str | None = None  # for error messages: the newest complete checkpoint folder
    rewards: Any = None  # the RL reward and tokenised references (epoch_loops.captioning.rl), built at the first RL epoch

    @classmethod
    def create(cls, cfg: Config, agents: Agents, train_batches: CaptionLoader, meteor: Meteor) -> Trainer:
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
        return cls(cfg, agents, optimizer, scheduler, train_batches, device, meteor)

    def group(self, name: str) -> dict:
        return next(g for g in self.optimizer.param_groups if g["name"] == name)

    def agent_lr(self) -> float:
        return self.group("worker")["lr"]


def _parameters(modules: Sequence[torch.nn.Module]) -> list[torch.nn.Parameter]:
    seen: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def optimiser_step(
    trainer: Trainer, loss: torch.Tensor, epoch: int, batch_index: int, batch: CaptionBatch
) -> float:
    """Backward, clip the gradient norm (--grad_clip) *before* the step, step. The agent's gradients and the value
    functions' are clipped each on their own (an RL loss sums a policy loss and a value loss whose scales have
    nothing to do with each other). A non-finite loss or gradient stops the run before the step, naming where,
    with the last checkpoint intact. Returns the agent's gradient norm before clipping."""
    if not torch.isfinite(loss):
        raise diverged(trainer, "loss", float(loss.detach()), epoch, batch_index, batch)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = trainer.cfg.grad_clip if trainer.cfg.grad_clip else math.inf
    norms = []
    for value_functions in (False, True):
        params = [
            p
            for g in trainer.optimizer.param_groups
            if g["name"].endswith("value_function") == value_functions
            for p in g["params"]
            if p.grad is not None
        ]
        norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not torch.isfinite(norms[-1]):
            raise diverged(trainer, "gradient norm", float(norms[-1]), epoch, batch_index, batch)
    trainer.optimizer.step()
    trainer.step += 1
    return float(norms[0])


def diverged(
    trainer: Trainer, what: str, value: float, epoch: int, batch_index: int, batch: CaptionBatch
) -> InputError:
    videos = ", ".join(dict.fromkeys(batch.video_ids[:3]))
    kept = (
        f"the last good checkpoint is {trainer.last_checkpoint}"
        if trainer.last_checkpoint
        else "no checkpoint had been written yet"
    )
    return InputError(
        f"non-finite {what} ({value}) in epoch {epoch}, batch {batch_index} (optimiser step {trainer.step + 1}; "
        f"videos {videos}, ...): stopped before the step; {kept}. Try a lower learning rate or --grad_clip"
    )
