"""METEOR 1.5 through the jar that pycocoevalcap ships, behind one long-lived Java process.

pycocoevalcap starts a JVM per scorer and does one blocking round trip per sentence pair; starting the JVM
(loading the paraphrase table) alone takes seconds. Here one process lives as long as the `Meteor` object,
requests are batched (all lines are written, then all answers read), every exchange has a timeout, a dead
process is restarted on the next call, and a Java failure is raised with the process's stderr instead of
hanging. The same object serves the evaluator and the RL rewards; a lock makes it thread-safe.

Protocol of `-stdio` mode: `SCORE ||| ref_1 ||| ... ||| ref_n ||| hyp` answers one line of sufficient
statistics; `EVAL ||| stats_1 ||| ... ||| stats_k` answers k per-segment scores and then the aggregate score.
`score_from_stats` computes EVAL's per-segment scores in Python, bit for bit, but for the rare rows it marks.
"""

from __future__ import annotations

import collections
import os
import platform
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pycocoevalcap.meteor.meteor as _pycoco_meteor

METEOR_JAR = Path(_pycoco_meteor.__file__).with_name("meteor-1.5.jar")
JAVA_ENV = "MMRL_JAVA"  # overrides the `java` executable for METEOR and the PTB tokenizer

# Parameters of `-l en` (its default task "rank": Constants.PARAM_RANK / WEIGHT_RANK of the jar, as
# MeteorConfiguration hands them to MeteorScorer); `-norm` only changes tokenisation, not the scoring.
ALPHA = 0.85  # precision/recall weight of the harmonic mean
BETA = 0.2  # fragmentation exponent; the double nearest 1/5, exactly 1/5 + 2**-54/5
GAMMA = 0.6  # maximum fragmentation penalty
DELTA = 0.75  # weight of content words against function words
MODULE_WEIGHTS = (1.0, 0.6, 0.8, 0.6)  # matches of the exact, stem, synonym and paraphrase stages
# Java's Math.pow (the HotSpot x86-64 intrinsic) is not correctly rounded: on 21M arguments it rounded the
# wrong way only when the exact power lay within 0.0045 ulp of a rounding midpoint. Closer than this, the
# Python side cannot tell which way Java rounds.
POW_MARGIN = 0.01  # ulp
# `score_from_stats` is checked against HotSpot's x86-64 Math.pow; elsewhere every score comes from Java.
POW_VERIFIED = platform.machine().lower() in ("x86_64", "amd64")
STATS_FIELDS = 23  # numbers in one `SCORE` answer
PUMP_INTERVAL_S = 0.001  # how often Java's answers are read


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


def score_from_stats(values: np.ndarray) -> np.ndarray:
    """Per-segment METEOR of statistics rows (N, 23), equal to the last bit to what `EVAL` answers.

    It follows MeteorScorer.computeMetrics operation by operation (IEEE double arithmetic is the same in
    numpy and Java). NaN marks the few rows (under 2%) whose Math.pow is too close to a tie to reproduce: ask
    Java for those. Columns, as MeteorStats(String) reads them: test/reference length, test/reference
    function words, 4 stages × (test content, reference content, test function, reference function) matches,
    chunks, test/reference word matches.
    """
    v = np.asarray(values, dtype=np.float64)
    test_len, ref_len, test_function, ref_function = v[:, 0], v[:, 1], v[:, 2], v[:, 3]
    chunks, test_words, ref_words = v[:, 20], v[:, 21], v[:, 22]
    test_weighted_len = DELTA * (test_len - test_function) + (1.0 - DELTA) * test_function
    ref_weighted_len = DELTA * (ref_len - ref_function) + (1.0 - DELTA) * ref_function
    test_weighted = ref_weighted = 0.0
    # the content matches of all stages, then the function ones
    for stage, weight in enumerate(MODULE_WEIGHTS):
        test_weighted = test_weighted + v[:, 4 + 4 * stage] * weight * DELTA
        ref_weighted = ref_weighted + v[:, 5 + 4 * stage] * weight * DELTA
    for stage, weight in enumerate(MODULE_WEIGHTS):
        test_weighted = test_weighted + v[:, 6 + 4 * stage] * weight * (1.0 - DELTA)
        ref_weighted = ref_weighted + v[:, 7 + 4 * stage] * weight * (1.0 - DELTA)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = test_weighted / test_weighted_len
        recall = ref_weighted / ref_weighted_len
        fmean = 1.0 / ((1.0 - ALPHA) / precision + ALPHA / recall)
        frag = np.where(perfect_segments(v), 0.0, chunks / ((test_words + ref_words) / 2.0))
        power, undecided = _java_pow_beta(frag)
        score = fmean * (1.0 - GAMMA * power)
    score = np.where(score > 0.0, score, 0.0)  # Java: NaN -> 0, else Math.max(score, 0.0) (no -0.0)
    score[undecided] = np.nan
    return score


def perfect_segments(values: np.ndarray) -> np.ndarray:
    """Rows (N, 23) whose every word matched, in a single chunk: METEOR gives them no fragmentation penalty,
    and `MeteorStats.addStats` does not count their chunk. Whole numbers: the sums are exact in any order."""
    test_total = values[:, 4:20:4].sum(axis=1) + values[:, 6:20:4].sum(axis=1)
    ref_total = values[:, 5:20:4].sum(axis=1) + values[:, 7:20:4].sum(axis=1)
    return (test_total == values[:, 0]) & (ref_total == values[:, 1]) & (values[:, 20] == 1.0)


def _java_pow_beta(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Math.pow(x, BETA) as Java computes it, and a mask of where it cannot be known without Java.

    Java's pow errs only next to rounding ties, so this is the correctly rounded power, checked for ties: one
    Newton step for the fifth root in double-double arithmetic (Dekker's exact products) corrects numpy's
    approximation, plus the first-order term of the 2**-54/5 that BETA exceeds 1/5 by.
    """
    with np.errstate(all="ignore"):
        approx = np.power(x, BETA)
        hi, lo = _two_product(approx, approx)
        hi, lo = _dd_product(hi, lo, hi, lo)
        hi, lo = _dd_product(hi, lo, approx, 0.0)
        residual = (x - hi) - lo  # x - approx**5, exact up to a rounding of the last term
        correction = approx * (residual / (5.0 * x)) + approx * np.log(x) / (5.0 * 2.0**54)
        power = approx + correction
        rounding = correction - (power - approx)  # exact: the exact power minus its nearest double
        gap = np.where(rounding >= 0, np.nextafter(power, np.inf) - power, power - np.nextafter(power, 0.0))
        decided = (np.abs(rounding) < (0.5 - POW_MARGIN) * gap) & (x > 2.0**-900)  # error terms stay normal
    special = (x == 0.0) | ~np.isfinite(x)  # 0, inf, NaN: numpy's pow agrees with Java's
    return np.where(special, approx, power), ~(decided | special)


def _two_product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a * b as an unevaluated sum hi + lo, exactly (Dekker)."""
    product = a * b
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    return product, ((a_hi * b_hi - product) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def _split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scaled = 134217729.0 * a  # 2**27 + 1: halves of 26 bits whose products are exact
    hi = scaled - (scaled - a)
    return hi, a - hi


def _dd_product(
    a_hi: np.ndarray, a_lo: np.ndarray, b_hi: np.ndarray, b_lo: np.ndarray | float
) -> tuple[np.ndarray, np.ndarray]:
    """Product of two double-doubles, to about 2**-104 relative."""
    hi, lo = _two_product(a_hi, b_hi)
    lo = lo + (a_hi * b_lo + a_lo * b_hi)
    total = hi + lo
    return total, lo - (total - hi)


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

    def stats(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
        """Sufficient statistics of each (hypothesis, references) pair: one `SCORE` line each."""
        lines = [" ||| ".join(["SCORE", *map(sanitize, refs), sanitize(hyp)]) for hyp, refs in pairs]
        return [answer[0] for answer in self._exchange(lines, [1] * len(lines))]

    def aggregate(self, groups: Sequence[Sequence[str]]) -> list[float]:
        """Corpus METEOR of each group of statistics: one `EVAL` per group, its last answer line."""
        answers = self._exchange([self._eval_line(group) for group in groups], [len(g) + 1 for g in groups])
        return [float(answer[-1]) for answer in answers]

    def java_segment_scores(self, stats: Sequence[str]) -> list[float]:
        """Sentence-level METEOR of each statistics line, from Java (one `EVAL` for all of them)."""
        if not stats:
            return []
        (answer,) = self._exchange([self._eval_line(stats)], [len(stats) + 1])
        return [float(line) for line in answer[:-1]]

    def segment_scores(self, values: np.ndarray) -> np.ndarray:
        """Sentence-level METEOR of each statistics row (N, 23), as Java's `EVAL` answers it: computed here
        (Java's EVAL costs about 0.1 ms a row), asking Java only for rows `score_from_stats` cannot decide."""
        values = np.asarray(values, dtype=np.float64).reshape(-1, STATS_FIELDS)
        scores = score_from_stats(values) if POW_VERIFIED else np.full(len(values), np.nan)
        undecided = np.flatnonzero(np.isnan(scores))
        if undecided.size:
            scores[undecided] = self.java_segment_scores([stats_line(values[i]) for i in undecided])
        return scores

    def sentence_scores(self, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[float]:
        """Sentence-level METEOR of each (hypothesis, references) pair, e.g. for RL rewards."""
        return self.segment_scores(parse_stats(self.stats(pairs))).tolist()

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
