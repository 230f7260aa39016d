"""Console logging and progress bars: bars only on a TTY and only when `--progress` (the default) is on."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
_progress_enabled = True


def setup_logging(progress: bool = True, level: int = logging.INFO) -> None:
    global _progress_enabled
    _progress_enabled = progress
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """tqdm over `iterable` on a TTY with progress enabled; the plain iterable otherwise."""
    disable = not (_progress_enabled and sys.stderr.isatty())
    return iter(tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True))
