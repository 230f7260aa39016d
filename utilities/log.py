"""Console logging and progress bars: bars only on a TTY and only when `--progress` (the default) is on. A run
keeps a copy of its console in its folder (`ConsoleCopy`: `train.log`)."""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
_progress_enabled = True


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(progress: bool = True, level: int = logging.INFO) -> None:
    global _progress_enabled
    _progress_enabled = progress
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


PROGRESS_LINE_SECONDS = 60.0


def progress(
    iterable: Iterable[T],
    desc: str,
    total: int | None = None,
    unit: str = "it",
    every: float = PROGRESS_LINE_SECONDS,
) -> Iterator[T]:
    """With `--progress` (the default): a tqdm bar on a TTY; elsewhere (a log file, nohup, a job queue) a log
    line at most every `every` seconds, so that a long loop is seen to move. Without: the plain iterable."""
    if not _progress_enabled:
        return iter(iterable)
    if sys.stderr.isatty():
        return iter(tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True))
    return _progress_lines(iterable, desc, total, unit, every)


def _progress_lines(
    iterable: Iterable[T], desc: str, total: int | None, unit: str, every: float
) -> Iterator[T]:
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    started = last = time.perf_counter()
    for done, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if now - last >= every:
            last = now
            of = f"/{total} ({100 * done / total:.0f}%)" if total else ""
            logging.getLogger(__name__).info(
                "%s: %d%s %s, %.3g %s/s", desc, done, of, unit, done / (now - started), unit
            )


class ConsoleCopy(logging.Handler):
    """A copy of the console, as the user saw it, in a file: what is printed (stdout) and the log records at
    the level the console shows (the progress bars are left out). It starts at once, held in memory, and goes
    into the file when `attach` names it (a run's folder appears with its first write), so the lines before it
    are kept; `stop` restores stdout and removes the handler. Copies nest: a demo's sub-run's lines are in its
    own file and in the demo's."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.sink: TextIO = io.StringIO()
        self.stdout = sys.stdout
        sys.stdout = _Tee(self.stdout, self)
        logging.getLogger().addHandler(self)

    def attach(self, path: Path) -> None:
        """Write what was held so far into `path` and every later line as it comes."""
        if isinstance(self.sink, io.StringIO):
            held, self.sink = self.sink.getvalue(), path.open("a", encoding="utf-8")
            self.write(held)

    def write(self, text: str) -> None:
        if not self.sink.closed:
            self.sink.write(text)
            self.sink.flush()

    def emit(self, record: logging.LogRecord) -> None:
        self.write(self.format(record) + "\n")

    def stop(self) -> None:
        logging.getLogger().removeHandler(self)
        if isinstance(sys.stdout, _Tee) and sys.stdout.copy is self:
            sys.stdout = self.stdout
        self.sink.close()


class _Tee(io.TextIOBase):
    """stdout that also writes into a `ConsoleCopy` (until the copy stops); anything else is the stream's."""

    def __init__(self, stream: TextIO, copy: ConsoleCopy):
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding
