"""Captions with per-token segment-boundary labels, for training the segment critic.

The original critic was trained on Charades Captions: a JSON list of entries `{"captions": [...], "seg_labels":
[[...], ...]}`, one 0/1 label per whitespace-separated word of each caption (1: the word ends a segment). The
critic itself reads our tokens (spaCy, lower-cased), so each word's label moves to the last token the word splits
into ("down." → "down" 0, "." 1) and the word's other tokens get 0. Every word is kept: the original replaced the
last word by `</s>` (dropping it from the input), here the input is the agent's decoder input `<s> w1 … wn`.
A single caption string with a flat label list is accepted as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datasets.vocabulary import tokenize
from utilities.errors import InputError
from utilities.files import read_json


@dataclass(frozen=True)
class LabelledCaption:
    caption: str  # as written in the file
    tokens: list[str]  # our tokenisation of the caption, without specials
    labels: list[int]  # one per token: 1 where the token ends a segment


def read_seg_labels_json(path: str | Path) -> list[LabelledCaption]:
    """Every caption of a Charades-Captions-style JSON with its labels moved onto our tokens; errors name the
    entry, the caption and the reason."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: segment-label JSON not found")
    entries = read_json(path)
    if not isinstance(entries, list):
        raise InputError(f'{path}: expected a JSON list of {{"captions": ..., "seg_labels": ...}} entries')
    labelled: list[LabelledCaption] = []
    for e, entry in enumerate(entries):
        where = f"{path}: entry {e}"
        if not isinstance(entry, dict) or "captions" not in entry or "seg_labels" not in entry:
            raise InputError(f'{where}: expected an object with "captions" and "seg_labels"')
        captions, labels = entry["captions"], entry["seg_labels"]
        if isinstance(captions, str):  # one caption with a flat label list
            captions, labels = [captions], [labels]
        if not isinstance(captions, list) or not isinstance(labels, list) or len(captions) != len(labels):
            raise InputError(
                f"{where}: {_count(captions)} captions but {_count(labels)} label lists (one list per caption)"
            )
        for c, (caption, caption_labels) in enumerate(zip(captions, labels, strict=True)):
            where_c = f"{where}, caption {c}"
            if not isinstance(caption, str) or not caption.split():
                raise InputError(f"{where_c}: expected a non-empty caption string, got {caption!r}")
            split = caption.split()
            if not isinstance(caption_labels, list) or len(caption_labels) != len(split):
                raise InputError(
                    f"{where_c}: {len(split)} words but {_count(caption_labels)} labels (one per "
                    f"whitespace-separated word): {caption!r}"
                )
            if any(label not in (0, 1) or isinstance(label, float) for label in caption_labels):
                raise InputError(f"{where_c}: labels must be 0 or 1, got {caption_labels}")
            labelled.append(_onto_tokens(caption, [int(label) for label in caption_labels]))
    if not labelled:
        raise InputError(f"{path}: no captions")
    return labelled


def _onto_tokens(caption: str, labels: list[int]) -> LabelledCaption:
    tokens: list[str] = []
    token_labels: list[int] = []
    for word_tokens, label in zip(tokenize(caption.split()), labels, strict=True):
        if not word_tokens:  # a word of spaces only (non-breaking ones) has no token to carry its label
            continue
        tokens += word_tokens
        token_labels += [0] * (len(word_tokens) - 1) + [label]
    return LabelledCaption(caption, tokens, token_labels)


def _count(value) -> str:
    return str(len(value)) if isinstance(value, list) else f"not a list ({type(value).__name__})"
