"""The run directory `log/<procedure>/<exp_name>/`: config.json, TensorBoard events, metrics, predictions and
`checkpoints/`. Everything needed to reproduce or resume a run lives there; nothing is overwritten silently."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from utilities.config import Config
from utilities.files import write_json_atomic


def is_rank0() -> bool:
    """True on the only process, or on rank 0 under torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        self._writer = None

    @property
    def checkpoints(self) -> Path:
        folder = self.path / "checkpoints"
        folder.mkdir(exist_ok=True)
        return folder

    @property
    def writer(self):
        """TensorBoard SummaryWriter on rank 0 (None elsewhere), created on first use."""
        if self._writer is None and is_rank0():
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path))
        return self._writer

    def write_json(self, name: str, content: Any) -> Path:
        """Write `content` to `<run>/<name>` atomically (temp file + rename)."""
        return write_json_atomic(self.path / name, content)

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
        """Create (or, for `--resume` from a checkpoint inside it, reopen) the run directory; save config.json."""
        root = Path(cfg.log_dir) / cfg.procedure
        if cfg.exp_name is None:
            cfg.exp_name = _free_timestamp_name(root)
        path = root / cfg.exp_name
        if path.exists() and any(path.iterdir()) and not _resumes_inside(cfg, path):
            raise SystemExit(
                f"main.py: error: run directory {path} already exists; choose another --exp_name "
                "or --resume a checkpoint inside it"
            )
        path.mkdir(parents=True, exist_ok=True)
        cfg.save(path / "config.json")
        run = cls(path)
        try:
            yield run
        finally:
            run.close()


def _free_timestamp_name(root: Path) -> str:
    name = time.strftime("%y%m%d%H%M%S")
    candidate, n = name, 1
    while (root / candidate).exists():
        candidate, n = f"{name}_{n}", n + 1
    return candidate


def _resumes_inside(cfg: Config, path: Path) -> bool:
    return bool(cfg.resume) and path.resolve() in Path(cfg.resume).resolve().parents
