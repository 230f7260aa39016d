"""METEOR 1.5 through the jar that pycocoevalcap ships, behind one long-lived Java process.

pycocoevalcap starts a JVM per scorer and does one blocking round trip per sentence pair; starting the JVM
(loading the paraphrase table) alone takes seconds. Here one process lives as long as the `Meteor` object,
requests are batched (all lines are written, then all answers read), every exchange has a timeout, a dead
process is restarted on the next call, and a Java failure is raised with the process's stderr instead of
hanging. The same object serves the evaluator and the RL rewards; a lock makes it thread-safe.

Protocol of `-stdio` mode: `SCORE ||| ref_1 ||| ... ||| ref_n ||| hyp` answers one line of sufficient
statistics; `EVAL ||| stats_1 ||| ... ||| stats_k` answers k per-segment scores and then the aggregate score.
"""

from __future__ import annotations

import collections
import os
import queue
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import pycocoevalcap.meteor.meteor as _pycoco_meteor

METEOR_JAR = Path(_pycoco_meteor.__file__).with_name("meteor-1.5.jar")
JAVA_ENV = "MMRL_JAVA"  # overrides the `java` executable for METEOR and the PTB tokenizer


class JavaError(RuntimeError):
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


def sanitize(sentence: str) -> str:
    """Make a sentence safe for the line protocol, as pycocoevalcap does for hypotheses (and newlines)."""
    sentence = sentence.replace("\r", " ").replace("\n", " ")
    return sentence.replace("|||", "").replace("  ", " ")


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
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=50)

    # ---- public API ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the process now (it loads for seconds) so that the loading overlaps with other work."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()

    def stats(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
        """Sufficient statistics of each (hypothesis, references) pair: one `SCORE` line each."""
        lines = [" ||| ".join(["SCORE", *map(sanitize, refs), sanitize(hyp)]) for hyp, refs in pairs]
        return [answer[0] for answer in self._exchange(lines, [1] * len(lines))]

    def aggregate(self, groups: Sequence[Sequence[str]]) -> list[float]:
        """Corpus METEOR of each group of statistics: one `EVAL` per group, its last answer line."""
        answers = self._exchange([self._eval_line(group) for group in groups], [len(g) + 1 for g in groups])
        return [float(answer[-1]) for answer in answers]

    def segment_scores(self, stats: Sequence[str]) -> list[float]:
        """Sentence-level METEOR of each statistics line (one `EVAL` for all of them)."""
        if not stats:
            return []
        (answer,) = self._exchange([self._eval_line(stats)], [len(stats) + 1])
        return [float(line) for line in answer[:-1]]

    def sentence_scores(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[float]:
        """Sentence-level METEOR of each (hypothesis, references) pair, e.g. for RL rewards."""
        return self.segment_scores(self.stats(pairs))

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
    @staticmethod
    def _eval_line(stats: Sequence[str]) -> str:
        if not stats:
            raise ValueError("METEOR EVAL needs at least one statistics line")
        return " ||| ".join(["EVAL", *stats])

    def _exchange(self, lines: list[str], answers_per_line: list[int]) -> list[list[str]]:
        """Send all lines, read the expected number of answers; kill the process on any failure."""
        if not lines:
            return []
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            payload = ("\n".join(lines) + "\n").encode()
            writer = threading.Thread(target=self._write, args=(self._proc, payload), daemon=True)
            writer.start()
            try:
                answers = [[self._read_line() for _ in range(n)] for n in answers_per_line]
                for answer in answers:
                    for line in answer:
                        float(line.split()[0])
            except (JavaError, ValueError, IndexError) as e:
                self._kill()
                raise JavaError(f"METEOR failed ({e}); stderr: {self._stderr_text()}") from None
            writer.join()
            return answers

    def _start(self) -> None:
        self._kill()
        self._lines = queue.Queue()
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
        threading.Thread(target=self._pump_stdout, args=(self._proc, self._lines), daemon=True).start()
        self._stderr_pump = threading.Thread(
            target=self._pump_stderr, args=(self._proc, self._stderr), daemon=True
        )
        self._stderr_pump.start()

    def _read_line(self) -> str:
        try:
            line = self._lines.get(timeout=self.timeout)
        except queue.Empty:
            raise JavaError(f"no answer within {self.timeout:g} s") from None
        if line is None:
            raise JavaError(f"the process exited (code {self._proc.wait()})")
        return line

    @staticmethod
    def _write(proc: subprocess.Popen, payload: bytes) -> None:
        try:
            proc.stdin.write(payload)
            proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the reader sees the exit and reports it with stderr

    @staticmethod
    def _pump_stdout(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for raw in proc.stdout:
            lines.put(raw.decode(errors="replace").strip())
        lines.put(None)

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
