"""What a training loop needs to give the same result on one process and under torchrun (DDP).

Without an initialised process group every function is the single-process identity, so loops call them
unconditionally. Rank-0-only side effects (files, TensorBoard, console) go through `utilities.run_dir.is_rank0`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over all processes (a copy; the input is left alone)."""
    total = value.detach().clone()
    if world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def loss_normaliser(count: torch.Tensor) -> torch.Tensor:
    """Divide a process's summed loss by this to get, after DDP averages the gradients over W processes, the
    gradient of (global sum / global count): global count / W. On one process: `count`."""
    return global_sum(count.to(torch.float64)).float() / world_size()
