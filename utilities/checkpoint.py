"""Checkpoints: atomic writes, safe loads and the full training state for an exact `--resume`.

A checkpoint is a plain dict of tensors and plain containers, so it always loads with
`torch.load(weights_only=True)`: a downloaded file can never run code. It holds the model weights, the optimiser
and scheduler state, epoch/step, the best metric, every RNG state, the config and the vocabulary.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utilities.config import Config
from utilities.errors import InputError
from utilities.files import atomic_path
from utilities.seeding import rng_states, set_rng_states

FORMAT_VERSION = 1
TRAINING_KEYS = ("format_version", "model", "optimizer", "epoch", "step", "best_metric", "rng", "config")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` through `atomic_path`: an interrupted write leaves the previous file at `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with `weights_only=True`; a missing, corrupt, truncated or unsafe file is an InputError."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(e)
        if "global" not in detail.lower():
            raise InputError(f"{path}: corrupt checkpoint ({detail})") from None
        raise InputError(
            f"{path}: refused to load: it contains pickled objects other than tensors and plain containers "
            f"(loaded with weights_only=True; {detail}). Load such a file only if you trust its source."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as e:
        raise InputError(f"{path}: corrupt or truncated checkpoint ({_first_line(e)})") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a dict checkpoint, found {type(state).__name__}")
    return state


def load_model_state(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Strict load that says exactly which keys are missing, unexpected or of the wrong shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    misshaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_head(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_head(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped ({len(misshaped)}): {_head(misshaped)}")
    if problems:
        raise InputError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state_dict)


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    *,
    epoch: int,
    step: int,
    best_metric: float | None,
    scheduler: Any = None,
    vocabulary: list[str] | None = None,
    data_generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Everything an exact resume needs. `epoch`/`step` count what is *done*."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "best_metric": best_metric,
        "rng": rng_states(),
        "data_generator": None if data_generator is None else data_generator.get_state(),
        "config": cfg.to_dict(),
        "vocabulary": vocabulary,
    }


def restore_training_state(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scheduler: Any = None,
    data_generator: torch.Generator | None = None,
    source: str = "checkpoint",
    allow_missing: Collection[str] = (),
) -> dict[str, Any]:
    """Put a `training_state` back into the live objects and the global RNGs; returns the counters.

    A scheduler or data-generator state on one side only (saved but nothing to restore it into, or expected
    but not saved) would make the resume silently inexact: an error, unless the caller names it in
    `allow_missing` (e.g. `{"scheduler"}` when a run deliberately adds a scheduler on resume).
    """
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:
        raise InputError(f"{source} is not a training checkpoint: missing {', '.join(missing)}")
    if state["format_version"] != FORMAT_VERSION:
        raise InputError(
            f"{source}: checkpoint format {state['format_version']}, this code reads {FORMAT_VERSION}"
        )
    load_model_state(model, state["model"], source)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise InputError(f"{source}: optimiser state does not fit ({e})") from None
    for name, live in (("scheduler", scheduler), ("data_generator", data_generator)):
        saved = state.get(name) is not None
        if saved != (live is not None) and name not in allow_missing:
            raise InputError(
                f"{source}: holds {name} state but this run has no {name} to restore it into"
                if saved
                else f"{source}: holds no {name} state but this run has a {name}: it cannot resume exactly"
            )
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if data_generator is not None and state.get("data_generator") is not None:
        data_generator.set_state(state["data_generator"])
    set_rng_states(state["rng"])
    return {"epoch": state["epoch"], "step": state["step"], "best_metric": state["best_metric"]}


def _head(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", … (+{len(items) - n})" if len(items) > n else "")


def _unpickler_detail(e: pickle.UnpicklingError) -> str:
    """The useful line of torch's long weights-only message (e.g. 'Unsupported global: GLOBAL os.system')."""
    text = str(e).split("WeightsUnpickler error:")[-1]
    return _first_line(RuntimeError(text))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
