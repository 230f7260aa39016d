"""METEOR 1.5 through the jar that pycocoevalcap ships, behind one long-lived Java process.

pycocoevalcap starts a JVM per scorer and does one blocking round trip per sentence pair; starting the JVM
(loading the paraphrase table) alone takes seconds. Here one process lives as long as the `Meteor` object,
requests are batched (all lines are written, then all answers read), every exchange has a timeout, a dead
process is restarted on the next call, and a Java failure is raised with the process's stderr instead of
hanging. The same object serves the evaluator and the RL rewards; a lock makes it thread-safe.

Protocol of `-stdio` mode: `SCORE ||| ref_1 ||| ... ||| ref_n ||| hyp` answers one line of sufficient
statistics; `EVAL ||| stats_1 ||| ... ||| stats_k` answers k per-segment scores and then the aggregate score.
Every score comes from METEOR's own `EVAL`: no re-implementation of its formula to drift from it.
"""

from __future__ import annotations

import collections
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pycocoevalcap.meteor.meteor as _pycoco_meteor

from utilities.errors import ToolError
from utilities.log import progress

METEOR_JAR = Path(_pycoco_meteor.__file__).with_name("meteor-1.5.jar")
JAVA_ENV = "MMRL_JAVA"  # overrides the `java` executable for METEOR and the PTB tokenizer

STATS_FIELDS = 23  # numbers in one `SCORE` answer
PUMP_INTERVAL_S = 0.001  # how often Java's answers are read


class JavaError(ToolError):
    """Java is missing, or a Java process died, timed out or answered garbage. The message has its stderr."""


def java_executable(java: str | None = None) -> str:
    """Resolve the java binary: the argument, else $MMRL_JAVA, else `java` on PATH; a clear error if absent."""
    name = java or os.environ.get(JAVA_ENV) or "java"
    path = shutil.which(name)
    if path is None:
        raise JavaError(
            f"Java executable {name!r} not found: METEOR 1.5 and the PTB tokenizer need Java (8 or newer). "
            "Install it (e.g. `apt-get install openjdk-17-jre-headless` or `conda install -c conda-forge "
            f"openjdk=17`) or point ${JAVA_ENV} at it."
        )
    return path


# Every character that Python's str.splitlines() (and Java, for some of them) treats as a line boundary.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_ONE_LINE = str.maketrans(dict.fromkeys(LINE_BREAKS, " "))


def one_line(sentence: str) -> str:
    """The sentence with every line break or separator character replaced by a space: the line protocols of
    METEOR and the PTB tokenizer need exactly one line per sentence, or every later answer is shifted."""
    return sentence.translate(_ONE_LINE)


def sanitize(sentence: str) -> str:
    """Make a sentence safe for METEOR's line protocol, as pycocoevalcap does for hypotheses (and breaks)."""
    return one_line(sentence).replace("|||", "").replace("  ", " ")


def perfect_segments(values: np.ndarray) -> np.ndarray:
    """Rows (N, 23) whose every word matched, in a single chunk: METEOR gives them no fragmentation penalty,
    and `MeteorStats.addStats` does not count their chunk. Whole numbers: the sums are exact in any order."""
    test_total = values[:, 4:20:4].sum(axis=1) + values[:, 6:20:4].sum(axis=1)
    ref_total = values[:, 5:20:4].sum(axis=1) + values[:, 7:20:4].sum(axis=1)
    return (test_total == values[:, 0]) & (ref_total == values[:, 1]) & (values[:, 20] == 1.0)


def parse_stats(lines: Sequence[str]) -> np.ndarray:
    """The (N, 23) array of N `SCORE` answers."""
    values = np.array(" ".join(lines).split(), dtype=np.float64)
    if values.size != STATS_FIELDS * len(lines):
        raise JavaError(f"METEOR answered {values.size} statistics for {len(lines)} segments")
    return values.reshape(len(lines), STATS_FIELDS)


def stats_line(row: np.ndarray) -> str:
    """A statistics row as `EVAL` reads it back."""
    return " ".join(repr(float(v)) for v in row)


class Meteor:
    """A METEOR 1.5 process (`-l en -norm`, as in pycocoevalcap). Use as a context manager or call close()."""

    def __init__(self, java: str | None = None, timeout: float = 120.0, memory: str = "2G"):
        self.timeout = timeout
        # The heap settings only change garbage collection (loading the paraphrase table allocates a lot):
        # about 10% faster start and scoring than the JVM's defaults, same numbers.
        self._cmd = [java_executable(java), "-XX:+UseParallelGC", f"-Xms{memory}", f"-Xmx{memory}"]
        self._cmd += ["-Xmn1G", "-jar", str(METEOR_JAR), "-", "-", "-stdio", "-l", "en", "-norm"]
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._chunks: queue.Queue[list[str] | None] = queue.Queue()  # answer lines, as the pump reads them
        self._lines: collections.deque[str] = collections.deque()  # lines taken from _chunks, not yet read
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)

    # ---- public API ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the process now (it loads for seconds) so that the loading overlaps with other work."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()

    def stats(self, pairs: Sequence[tuple[str, Sequence[str]]], desc: str | None = None) -> list[str]:
        """Sufficient statistics of each (hypothesis, references) pair: one `SCORE` line each. `desc`: show the
        answers' progress under this name (scoring a whole split takes minutes; RL rewards pass none)."""
        lines = [" ||| ".join(["SCORE", *map(sanitize, refs), sanitize(hyp)]) for hyp, refs in pairs]
        return [answer[0] for answer in self._exchange(lines, [1] * len(lines), desc)]

    def segment_scores(self, stats: Sequence[str] | np.ndarray) -> np.ndarray:
        """Sentence-level METEOR of each statistics line (or row of an (N, 23) array), as METEOR's own `EVAL`
        computes it: one exchange for all of them."""
        if isinstance(stats, np.ndarray):
            stats = [stats_line(row) for row in stats.reshape(-1, STATS_FIELDS)]
        if not len(stats):
            return np.zeros(0)
        (answer,) = self._exchange([" ||| ".join(["EVAL", *stats])], [len(stats) + 1])
        return np.array([float(line) for line in answer[:-1]])

    def sentence_scores(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[float]:
        """Sentence-level METEOR of each (hypothesis, references) pair, e.g. for RL rewards."""
        return self.segment_scores(self.stats(pairs)).tolist()

    def close(self) -> None:
        with self._lock:
            self._kill()

    def __enter__(self) -> Meteor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._kill()

    # ---- process handling ------------------------------------------------------------------------------
    def _exchange(
        self, lines: list[str], answers_per_line: list[int], desc: str | None = None
    ) -> list[list[str]]:
        """Send all lines, read the expected number of answers (`desc`: with progress); kill the process on any
        failure."""
        if not lines:
            return []
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            payload = ("\n".join(lines) + "\n").encode()
            writer = threading.Thread(target=self._write, args=(self._proc, payload), daemon=True)
            writer.start()
            try:
                counts = answers_per_line if desc is None else progress(answers_per_line, desc, unit="pair")
                answers = [[self._read_line() for _ in range(n)] for n in counts]
                for answer in answers:
                    for line in answer:
                        float(line.split()[0])
            except (JavaError, ValueError, IndexError) as e:
                self._kill()
                raise JavaError(f"METEOR failed ({e}); stderr: {self._stderr_text()}") from None
            except BaseException:
                # An interrupt (or any other error) mid-exchange leaves answers unread: a process kept alive
                # would hand them to the next caller. Only a fresh process is safe.
                self._kill()
                raise
            writer.join()
            return answers

    def _start(self) -> None:
        self._kill()
        self._chunks, self._lines = queue.Queue(), collections.deque()
        self._stderr.clear()
        try:
            self._proc = subprocess.Popen(
                self._cmd,
                cwd=METEOR_JAR.parent,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as e:
            raise JavaError(f"could not start METEOR ({' '.join(self._cmd)}): {e}") from None
        threading.Thread(target=self._pump_stdout, args=(self._proc, self._chunks), daemon=True).start()
        self._stderr_pump = threading.Thread(
            target=self._pump_stderr, args=(self._proc, self._stderr), daemon=True
        )
        self._stderr_pump.start()

    def _read_line(self) -> str:
        if not self._lines:
            try:
                chunk = self._chunks.get(timeout=self.timeout)
            except queue.Empty:
                raise JavaError(f"no answer within {self.timeout:g} s") from None
            if chunk is None:
                raise JavaError(f"the process exited (code {self._proc.wait()})")
            self._lines.extend(chunk)
        return self._lines.popleft()

    @staticmethod
    def _write(proc: subprocess.Popen, payload: bytes) -> None:
        try:
            proc.stdin.write(payload)
            proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the reader sees the exit and reports it with stderr

    @staticmethod
    def _pump_stdout(proc: subprocess.Popen, chunks: queue.Queue) -> None:
        """Forward whole answer lines in chunks. METEOR flushes every line; reading them one by one would wake
        this thread (and hand over the GIL) tens of thousands of times per evaluation, so it reads at most
        every millisecond and takes whatever has arrived."""
        pending = b""
        while data := proc.stdout.read1(1 << 20):
            *complete, pending = (pending + data).split(b"\n")
            if complete:
                chunks.put([raw.decode(errors="replace").strip() for raw in complete])
            time.sleep(PUMP_INTERVAL_S)
        if pending:
            chunks.put([pending.decode(errors="replace").strip()])
        chunks.put(None)

    @staticmethod
    def _pump_stderr(proc: subprocess.Popen, tail: collections.deque) -> None:
        for raw in proc.stderr:
            tail.append(raw.decode(errors="replace").rstrip())

    def _stderr_text(self) -> str:
        self._stderr_pump.join(timeout=2.0)  # the process is dead by now: let its last words arrive
        return " | ".join(self._stderr) or "(empty)"

    def _kill(self) -> None:
        proc, self._proc = getattr(self, "_proc", None), None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
