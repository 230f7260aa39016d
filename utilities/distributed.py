"""What a training loop needs to give the same result on one process and under torchrun.

Without an initialised process group every function is the single-process identity, so loops call them
unconditionally. Rank-0-only side effects (files, TensorBoard, console) go through `utilities.run_dir.is_rank0`.

Under torchrun (`WORLD_SIZE` > 1) `process_group` joins the job: gloo on the CPU, NCCL on CUDA with one process
per device (`LOCAL_RANK` → `cuda:LOCAL_RANK`), and a timeout (`--dist_timeout`) after which a collective that
waits for a dead or stuck rank fails instead of hanging. Batch flags are global: each rank takes a contiguous
share of every global batch (`share`). A rank whose share of a (last, short) global batch is empty steps on a
stand-in sample that contributes nothing (`stand_in`): its collectives line up with the other ranks'.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from utilities.errors import InputError
from utilities.run_dir import launched_world_size

T = TypeVar("T")
_contributing = True  # False while a rank steps on a stand-in sample


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextmanager
def process_group(device: str, timeout_s: float) -> Iterator[str]:
    """Join torchrun's job for the run (nothing without torchrun) and yield this process's device: `cuda`
    becomes `cuda:LOCAL_RANK`. The group is left at the end, also when the run fails."""
    if launched_world_size() <= 1:
        yield device
        return
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    try:
        yield device
    finally:
        dist.destroy_process_group()


def check_global_batch(flag: str, size: int) -> None:
    """A global batch flag must split evenly over the processes (one line naming the flag otherwise)."""
    if size % world_size():
        raise InputError(
            f"--{flag} {size} is the global batch and does not split over {world_size()} processes: give a "
            f"multiple of {world_size()}"
        )


def share(indices: Sequence[int], of_rank: int | None = None, world: int | None = None) -> list[int]:
    """This rank's contiguous part of a global batch (or of a validation split): shares differ in length by at
    most one and, concatenated in rank order, give `indices` back."""
    r = rank() if of_rank is None else of_rank
    w = world_size() if world is None else world
    n = len(indices)
    return list(indices[r * n // w : (r + 1) * n // w])


@contextmanager
def stand_in(active: bool) -> Iterator[None]:
    """While active, this rank's counts go into `loss_normaliser` as 0 and its loss is zeroed by the optimiser
    step: it takes part in every collective of a step without changing the result."""
    global _contributing
    previous, _contributing = _contributing, not active
    try:
        yield
    finally:
        _contributing = previous


def contributing() -> bool:
    return _contributing


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over all processes (a copy; the input is left alone)."""
    total = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def global_max(value: torch.Tensor) -> torch.Tensor:
    """`value`'s elementwise maximum over all processes (a copy; the input is left alone)."""
    largest = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return largest


def loss_normaliser(count: torch.Tensor) -> torch.Tensor:
    """Divide a process's summed loss by this to get, after the gradients are averaged over W processes, the
    gradient of (global sum / global count): global count / W. On one process: `count`."""
    local = count.to(torch.float64) * (1.0 if _contributing else 0.0)
    return global_sum(local).float() / world_size()


def global_mean(local_mean: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """A loss that is the mean over this rank's `count` items, rescaled so that the gradients averaged over the
    ranks are those of the mean over the whole global batch (× count / `loss_normaliser`). On one process the
    factor is exactly 1: the loss is unchanged to the bit."""
    count = torch.as_tensor(count, device=local_mean.device)
    return local_mean * (count.float() / loss_normaliser(count))


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` over the processes in one all-reduce, so every rank takes the same
    optimiser step. A parameter without a gradient on this rank counts as zeros; one without a gradient on every
    rank keeps none (the optimiser leaves it alone, as on one process). Every rank passes the same list: the
    trained parameters only, so a frozen module costs no communication and can never stall the job."""
    if world_size() == 1 or not params:
        return
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    flat = torch.cat([*grads, has_grad.to(grads[0].dtype)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for p, anywhere in zip(params, flat[-len(params) :].tolist(), strict=True):
        p.grad = flat[offset : offset + p.numel()].view_as(p) if anywhere else None
        offset += p.numel()


def mean_over_ranks(stats: dict[str, float], weight: float) -> dict[str, float]:
    """Per-rank statistics of one step (every rank has the same keys) combined into the step's: each rank's value
    weighted by `weight`, its number of samples (0 for a stand-in)."""
    if world_size() == 1:
        return stats
    totals = global_sum(torch.tensor([*(weight * v for v in stats.values()), weight], dtype=torch.float64))
    return {key: float(totals[i] / totals[-1]) for i, key in enumerate(stats)}


def failing_ranks(failed: bool, device: torch.device | str = "cpu") -> list[int]:
    """The ranks on which `failed` holds (every rank calls this at the same point): a NaN on one rank stops
    all of them with the same message."""
    flags = torch.zeros(world_size(), device=device)
    flags[rank()] = float(failed)
    return [r for r, f in enumerate(global_sum(flags).tolist()) if f]


def gather(items: list[T]) -> list[T]:
    """Every rank's `items`, concatenated in rank order (the same list on every rank)."""
    if world_size() == 1:
        return list(items)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def from_rank0(value: T) -> T:
    """Rank 0's `value` on every rank (a metric computed on rank 0 steers every rank's loop)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
