"""The file formats of dense-captioning evaluation, read and validated here: submissions
(`{"results": {vid: [{"sentence", "timestamp"}]}}`) and references (`{vid: {"timestamps", "sentences"}}`), as
videos of timed sentences; and the official tIoU. Errors name the file, the video and the index."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utilities.errors import InputError
from utilities.files import read_json


@dataclass(frozen=True)
class TimedSentence:
    """A sentence and the time span it describes: one prediction or one reference segment."""

    start: float
    end: float
    sentence: str


Videos = dict[str, list[TimedSentence]]


# ---- input ---------------------------------------------------------------------------------------------------
def remove_nonascii(text: str) -> str:
    """The official evaluator's treatment of non-ASCII characters: each becomes a space."""
    return text if text.isascii() else "".join(c if ord(c) < 128 else " " for c in text)


def load_submission(path: str | Path) -> dict[str, Any]:
    """The `results` mapping of a submission file (`{"results": {vid: [{sentence, timestamp}]}, ...}`)."""
    submission = read_json(path)
    if not isinstance(submission, dict) or not isinstance(submission.get("results"), dict):
        raise InputError(f"{path}: a submission must be a JSON object with a 'results' object")
    return submission["results"]


def parse_predictions(results: Mapping[str, Any], source: str = "predictions") -> Videos:
    """Validate `{vid: [{"sentence": str, "timestamp": [start, end]}, ...]}`; errors name the video and index."""
    if not isinstance(results, Mapping):
        raise InputError(f"{source}: 'results' must map video ids to lists of predictions")
    videos: Videos = {}
    for vid, predictions in results.items():
        if not isinstance(predictions, list):
            raise InputError(f"{source}: video {vid!r}: expected a list of predictions")
        segments = []
        for i, prediction in enumerate(predictions):
            where = f"{source}: video {vid!r}, prediction {i}"
            if not isinstance(prediction, Mapping):
                raise InputError(f"{where}: expected an object with 'sentence' and 'timestamp'")
            missing = [key for key in ("sentence", "timestamp") if key not in prediction]
            if missing:
                raise InputError(f"{where}: the key {missing[0]!r} is missing")
            start, end = _timestamp(prediction["timestamp"], where)
            sentence = prediction["sentence"]
            if not isinstance(sentence, str):
                raise InputError(f"{where}: 'sentence' must be a string, got {type(sentence).__name__}")
            segments.append(TimedSentence(start, end, sentence))
        videos[vid] = segments
    return videos


def load_reference(path: str | Path) -> Videos:
    """A reference file `{vid: {"timestamps": [[s, e], ...], "sentences": [...]}}` (extra keys are ignored).
    Every procedure that scores captions or proposals takes them from `--reference_paths`, so a missing one
    names that flag."""
    if not Path(path).is_file():
        raise InputError(
            f"--reference_paths {path}: file not found (the val_1/val_2 reference JSONs: download_data.sh)"
        )
    data = read_json(path)
    return parse_reference(data, str(path))


def parse_reference(data: Any, source: str = "reference") -> Videos:
    if not isinstance(data, Mapping):
        raise InputError(f"{source}: a reference must map video ids to {{timestamps, sentences}}")
    videos: Videos = {}
    for vid, entry in data.items():
        where = f"{source}: video {vid!r}"
        if not isinstance(entry, Mapping):
            raise InputError(f"{where}: expected an object with 'timestamps' and 'sentences'")
        timestamps, sentences = entry.get("timestamps"), entry.get("sentences")
        if (
            not isinstance(timestamps, list)
            or not isinstance(sentences, list)
            or len(timestamps) != len(sentences)
        ):
            raise InputError(f"{where}: 'timestamps' and 'sentences' must be lists of the same length")
        segments = []
        for i, (timestamp, sentence) in enumerate(zip(timestamps, sentences, strict=False)):
            start, end = _timestamp(timestamp, f"{where}, segment {i}", check_order=False)
            if not isinstance(sentence, str):
                raise InputError(f"{where}, segment {i}: the sentence must be a string")
            segments.append(TimedSentence(start, end, sentence))
        videos[vid] = segments
    return videos


def _timestamp(value: Any, where: str, check_order: bool = True) -> tuple[float, float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    ok = ok and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )
    if not ok:
        raise InputError(f"{where}: 'timestamp' must be two finite numbers [start, end], got {value!r}")
    start, end = float(value[0]), float(value[1])
    if check_order and start > end:
        raise InputError(f"{where}: start {start} > end {end}")
    return start, end


# ---- tIoU ------------------------------------------------------------------------------------------------------
def tiou_matrix(predictions: Sequence[TimedSentence], references: Sequence[TimedSentence]) -> np.ndarray:
    """tIoU of every (prediction, reference) pair, with the official formula and operation order."""
    p = np.array([(s.start, s.end) for s in predictions], dtype=np.float64).reshape(-1, 2)
    r = np.array([(s.start, s.end) for s in references], dtype=np.float64).reshape(-1, 2)
    start_i, end_i = p[:, :1], p[:, 1:]
    start, end = r[:, 0][None, :], r[:, 1][None, :]
    intersection = np.maximum(0.0, np.minimum(end, end_i) - np.maximum(start, start_i))
    union = np.minimum(np.maximum(end, end_i) - np.minimum(start, start_i), end - start + end_i - start_i)
    return intersection / (union + 1e-8)
