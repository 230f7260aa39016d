"""Checkpoints: atomic writes, safe loads and the full training state for an exact `--resume`.

A checkpoint is a plain dict of tensors and plain containers, so it always loads with
`torch.load(weights_only=True)`: a downloaded file can never run code. It holds the model weights, the optimiser
and scheduler state, epoch/step, the best metric, every RNG state, the config and the vocabulary.
"""

from __future__ import annotations

import itertools
import pickle
import zipfile
from collections.abc import Collection, Mapping, Sequence
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


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    mmap: bool = False,
    safe_globals: Sequence[Any] = (),
) -> dict[str, Any]:
    """Load with `weights_only=True`; a missing, corrupt, truncated or unsafe file is an InputError. `mmap`:
    tensors stay on disk until read (for a look at a large file's settings). `safe_globals`: classes and
    functions the file may name besides torch's own (`torch.serialization.safe_globals` entries, an entry
    `(obj, "module.Name")` maps that pickled name to obj)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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


# (flag, state-dict key, axis): `state[key].shape[axis]` is the flag's value; axis None: the key holds a `{}` for
# a layer index and the flag is the number of layers present. A model lists its own as `SIZE_KEYS`.
SizeKey = tuple[str, str, int | None]


def load_model_state(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Strict load; a state that does not fit is an InputError (`check_model_state`)."""
    check_model_state(model, state_dict, source)
    model.load_state_dict(state_dict)


def check_model_state(model: nn.Module, state: Mapping[str, Any], source: str = "checkpoint") -> None:
    """InputError saying why `state` does not fit `model` (which may live on the meta device)."""
    problem = state_mismatch(state, model)
    if problem:
        raise InputError(f"{source} does not fit the model: {problem}")


def state_mismatch(state: Mapping[str, Any], model: nn.Module) -> str | None:
    """Why `state` does not fit `model`, or None. When the model's `SIZE_KEYS` show the state was saved at other
    sizes, the answer names the size flags that would fit (short, pasteable); otherwise it lists the missing,
    unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(k for k in set(own) & set(state) if _shape(state[k]) != tuple(own[k].shape))
    if not (missing or unexpected or misshaped):
        return None
    counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped keys"
    size_keys = getattr(model, "SIZE_KEYS", ())
    saved, built = sizes_in_state(state, size_keys), sizes_in_state(own, size_keys)
    differ = [flag for flag in saved if flag in built and saved[flag] != built[flag]]
    if differ:
        return (
            f"it was saved at other sizes: it fits {' '.join(f'--{f} {saved[f]}' for f in differ)} "
            f"(this model: {' '.join(f'--{f} {built[f]}' for f in differ)}; {counts})"
        )
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_head(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_head(unexpected)}")
    if misshaped:
        shapes = [f"{k}: checkpoint {_shape(state[k])} vs model {tuple(own[k].shape)}" for k in misshaped]
        problems.append(f"mis-shaped ({len(misshaped)}): {_head(shapes)}")
    return "; ".join(problems)


def sizes_in_state(state: Mapping[str, Any], size_keys: Sequence[SizeKey]) -> dict[str, int]:
    """The size flags a state dict shows (see `SizeKey`); a flag's first key present in `state` gives it."""
    sizes: dict[str, int] = {}
    for flag, key, axis in size_keys:
        if flag in sizes:
            continue
        if axis is None:
            layers = next(i for i in itertools.count() if key.format(i) not in state)
            if layers:
                sizes[flag] = layers
        elif isinstance(state.get(key), torch.Tensor) and state[key].dim() > axis:
            sizes[flag] = int(state[key].shape[axis])
    return sizes


def _shape(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def training_state(
    model: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    *,
    epoch: int,
    step: int,
    best_metric: float | None,
    scheduler: Any = None,
    vocabulary: list[str] | None = None,
    data_generator: torch.Generator | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Everything an exact resume needs. `epoch`/`step` count what is *done*. `model` None: the weights are
    saved beside it (a captioning checkpoint folder); `extra`: the loop's own counters and generators."""
    state = {
        "format_version": FORMAT_VERSION,
        "optimizer": optimizer.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "epoch": epoch,
        "step": step,
        "best_metric": best_metric,
        "rng": rng_states(),
        "data_generator": None if data_generator is None else data_generator.get_state(),
        "config": cfg.to_dict(),
        "vocabulary": vocabulary,
        **extra,
    }
    if model is not None:
        state["model"] = model.state_dict()
    return state


def restore_training_state(
    state: dict[str, Any],
    model: nn.Module | None,
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
    `allow_missing` (e.g. `{"scheduler"}` when a run deliberately adds a scheduler on resume). `model` None:
    the weights were loaded from their own files.
    """
    missing = [k for k in TRAINING_KEYS if k not in state and (k != "model" or model is not None)]
    if missing:
        raise InputError(f"{source} is not a training checkpoint: missing {', '.join(missing)}")
    if state["format_version"] != FORMAT_VERSION:
        raise InputError(
            f"{source}: checkpoint format {state['format_version']}, this code reads {FORMAT_VERSION}"
        )
    if model is not None:
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
    named = [line.strip() for line in text.splitlines() if "GLOBAL" in line]
    return named[0] if named else _first_line(RuntimeError(text))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
