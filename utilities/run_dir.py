"""The run directory `log/<procedure>/<exp_name>/`: config.json, TensorBoard events, metrics, predictions and
`checkpoints/`. Everything needed to reproduce or resume a run lives there; nothing is overwritten silently.

The folder is created, with config.json, by the run's first write (`materialise`, which every writer calls):
a run that stops on bad input before writing anything leaves no folder behind.
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

log = logging.getLogger(__name__)


def is_rank0() -> bool:
    """True on the only process, or on rank 0 under torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


class RunDir:
    def __init__(self, path: Path, config: Config, resuming: bool = False):
        self.path = path  # decided, not yet created: printing it is fine, writing goes through materialise()
        self._config = config
        self._resuming = resuming
        self._materialised = False
        self._writer = None

    def materialise(self) -> Path:
        """Create the folder and write config.json, once; returns the folder."""
        if not self._materialised:
            if not self._resuming:
                refuse_existing(self.path)  # another run may have taken the name since `open`
            self.path.mkdir(parents=True, exist_ok=True)
            self._config.save(self.path / "config.json")
            self._materialised = True
            log.info("run directory: %s", self.path)
        return self.path

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

    @classmethod
    @contextmanager
    def open(cls, cfg: Config) -> Iterator[RunDir]:
        """Decide the run directory (`--resume` from a checkpoint inside one reopens it) and record the settings
        as given for its config.json; nothing is created until the first write."""
        root = Path(cfg.log_dir) / cfg.procedure
        if cfg.exp_name is None:
            cfg.exp_name = _free_timestamp_name(root)
        path = root / cfg.exp_name
        resuming = _resumes_inside(cfg, path)
        if not resuming:
            refuse_existing(path)
        run = cls(path, Config(**copy.deepcopy(cfg.to_dict())), resuming)
        try:
            yield run
        finally:
            run.close()


def refuse_existing(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(
            f"run directory {path} already exists; choose another --exp_name or --resume a checkpoint inside it"
        )


def _free_timestamp_name(root: Path) -> str:
    name = time.strftime("%y%m%d%H%M%S")
    candidate, n = name, 1
    while (root / candidate).exists():
        candidate, n = f"{name}_{n}", n + 1
    return candidate


def _resumes_inside(cfg: Config, path: Path) -> bool:
    return bool(cfg.resume) and path.resolve() in Path(cfg.resume).resolve().parents
