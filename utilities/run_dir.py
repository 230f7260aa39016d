"""The run directory `log/<procedure>/<exp_name>/`: config.json, train.log (the console's lines), TensorBoard
events, metrics, predictions and `checkpoints/`. Everything needed to reproduce or resume a run lives there;
nothing is overwritten silently.

The folder is created, with config.json, by the run's first write (`materialise`, which every writer calls):
a run that stops on bad input before writing anything leaves no folder behind. A training run's resumable
checkpoint is named `checkpoints/last` (a folder), `checkpoints/last.pt` or `checkpoints/<name>_last.pt`;
`--resume` of one continues in the run directory that holds it.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from utilities.config import Config
from utilities.errors import InputError
from utilities.files import write_json_atomic
from utilities.log import ConsoleCopy

log = logging.getLogger(__name__)


def is_rank0() -> bool:
    """True on the only process, or on rank 0 under torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


def say(line: str) -> None:
    """A console line, printed by rank 0 only under torchrun."""
    if is_rank0():
        print(line)


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


CONSOLE_FILE = "train.log"


class RunDir:
    """A run's folder. From its creation to `close` (or the end of a `with` block) the console is copied into
    its `train.log` on rank 0 (a resumed run appends to it)."""

    def __init__(self, path: Path, config: Config, resuming: bool = False):
        self.path = path  # decided, not yet created: printing it is fine, writing goes through materialise()
        self._config = config
        self._resuming = resuming
        self._materialised = False
        self._writer = None
        self._console = ConsoleCopy() if is_rank0() else None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def log_every(self) -> int:
        """`--log_every`: optimiser steps per window of per-step TensorBoard scalars (0: none)."""
        return getattr(self._config, "log_every", 0) or 0

    def materialise(self) -> Path:
        """Create the folder and write config.json, once; returns the folder. Only rank 0 writes files."""
        if not is_rank0():
            raise RuntimeError(f"rank {os.environ.get('RANK')} tried to write into the run directory")
        if not self._materialised:
            if not self._resuming:
                refuse_existing(self.path)  # another run may have taken the name since `open`
            self.path.mkdir(parents=True, exist_ok=True)
            self._config.save(self.path / "config.json")
            if self._console is not None:
                self._console.attach(self.path / CONSOLE_FILE)
            self._materialised = True
            log.info("run directory: %s", self.path)
        return self.path

    def last_checkpoint(self) -> Path | None:
        """The run's resumable checkpoint on disk (None before the first one is written)."""
        return resumable_checkpoint(self.path)

    @property
    def checkpoints(self) -> Path:
        folder = self.materialise() / "checkpoints"
        folder.mkdir(exist_ok=True)
        return folder

    @property
    def writer(self):
        """TensorBoard SummaryWriter on rank 0 (None elsewhere), created on first use."""
        if self._writer is None and is_rank0():
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.materialise()))
        return self._writer

    def write_json(self, name: str, content: Any) -> Path:
        """Write `content` to `<run>/<name>` atomically (temp file + rename)."""
        return write_json_atomic(self.materialise() / name, content)

    def write_metrics(self, name: str, metrics: Any, metrics_out: str | None = None) -> Path:
        """Write metrics into the run directory and, when given, also to `--metrics_out`."""
        if metrics_out:
            write_json_atomic(metrics_out, metrics)
        return self.write_json(name, metrics)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._console is not None:
            self._console.stop()
            self._console = None

    @classmethod
    @contextmanager
    def open(cls, cfg: Config) -> Iterator[RunDir]:
        """Decide the run directory and record the settings as given for its config.json; nothing is created
        until the first write. `--resume` continues in the run directory the checkpoint belongs to, whatever
        `--exp_name` / `--log_dir` say (they are set to that directory's)."""
        if cfg.resume:
            path = run_of_checkpoint(cfg.resume)
            cfg.log_dir, cfg.exp_name = str(path.parent.parent), path.name
        else:
            root = Path(cfg.log_dir) / cfg.procedure
            if cfg.exp_name is None:
                cfg.exp_name = free_timestamp_name(root)
            path = root / cfg.exp_name
            refuse_existing(path)
        run = cls(path, Config(**copy.deepcopy(cfg.to_dict())), resuming=bool(cfg.resume))
        try:
            yield run
        finally:
            run.close()


def refuse_existing(path: Path) -> None:
    """A run never writes into another run's directory; the message says how to continue or clear it."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    checkpoint = resumable_checkpoint(path)
    if checkpoint is not None:
        raise InputError(
            f"run directory {path} already exists; choose another --exp_name, or continue that run with "
            f"--resume {checkpoint}"
        )
    raise InputError(
        f"run directory {path} already exists and holds no checkpoint to resume; delete it (rm -r {path}) or "
        "choose another --exp_name"
    )


def resumable_checkpoint(run_path: Path) -> Path | None:
    """`checkpoints/last`, `checkpoints/last.pt` or `checkpoints/<name>_last.pt` of a run directory, if any."""
    folder = run_path / "checkpoints"
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if p.name in ("last", "last.pt") or p.name.endswith("_last.pt")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def run_of_checkpoint(checkpoint: str | Path) -> Path:
    """The run directory of a checkpoint: the folder above the `checkpoints/` folder that holds it."""
    path = Path(checkpoint)
    for folder in (*path.parents, *path.resolve().parents):  # as given (for messages), else resolved
        if folder.name == "checkpoints":
            return folder.parent
    raise InputError(
        f"--resume {checkpoint}: not inside a run directory's checkpoints/ folder "
        "(<log_dir>/<procedure>/<exp_name>/checkpoints/...); a resumed run continues in its own run directory"
    )


def free_timestamp_name(root: Path) -> str:
    name = time.strftime("%y%m%d%H%M%S")
    candidate, n = name, 1
    while (root / candidate).exists():
        candidate, n = f"{name}_{n}", n + 1
    return candidate
