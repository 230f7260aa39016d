"""Caption tokenisation and the vocabulary.

Tokens come from spaCy's blank English tokenizer, lower-cased after tokenisation (as torchtext did). The
vocabulary is the original's layout: the specials [unk, pad, start, end] at ids 0–3, then the train tokens by
descending frequency, ties alphabetical. A model only works with the exact vocabulary it was trained with, so
the list is saved with every checkpoint and reloaded from it, never rebuilt.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from utilities.errors import InputError
from utilities.files import read_text

N_SPECIALS = 4


@lru_cache(maxsize=1)
def _spacy_tokenizer():
    import spacy

    return spacy.blank("en").tokenizer


def tokenize(captions: Sequence[str]) -> list[list[str]]:
    """Lower-cased spaCy tokens of each caption (batched through the tokenizer's pipe: ~50k captions/s)."""
    docs = _spacy_tokenizer().pipe(captions, batch_size=1000)
    return [[token.text.lower() for token in doc if not token.is_space] for doc in docs]


class Vocabulary:
    """itos/stoi with the four specials at ids 0–3: unk, pad, start, end."""

    def __init__(self, itos: Sequence[str], source: str = "vocabulary"):
        itos = list(itos)
        if len(itos) < N_SPECIALS or not all(isinstance(t, str) for t in itos):
            raise InputError(
                f"{source}: expected a list of at least {N_SPECIALS} token strings (unk, pad, start, end)"
            )
        stoi: dict[str, int] = {}
        for i, token in enumerate(itos):
            if token in stoi:
                raise InputError(f"{source}: token {token!r} appears twice (ids {stoi[token]} and {i})")
            stoi[token] = i
        self.itos, self.stoi = itos, stoi
        self.unk_token, self.pad_token, self.start_token, self.end_token = itos[:N_SPECIALS]
        self.unk_idx, self.pad_idx, self.start_idx, self.end_idx = range(N_SPECIALS)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """`<s> w1 … wn </s>` as ids; unknown tokens map to unk."""
        return [self.start_idx, *(self.stoi.get(t, self.unk_idx) for t in tokens), self.end_idx]

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first end token; start and pad are dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_idx:
                break
            if i not in (self.start_idx, self.pad_idx):
                words.append(self.itos[i])
        return " ".join(words)

    def to_list(self) -> list[str]:
        """A plain list: fits in a checkpoint loaded with `torch.load(weights_only=True)`."""
        return list(self.itos)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.itos, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """A JSON list, or one token per line (a line keeps its spaces: the original unk is ' UNK ')."""
        text = read_text(path)
        if text.lstrip().startswith("["):
            try:
                itos = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: not a valid JSON list ({e})") from None
        else:
            itos = text.rstrip("\n").split("\n")
        return cls(itos, source=str(path))


def build_vocabulary(
    captions: Sequence[str],
    specials: tuple[str, str, str, str] = ("<unk>", "<blank>", "<s>", "</s>"),
    min_freq: int = 1,
) -> Vocabulary:
    """Specials, then tokens with count ≥ `min_freq` by descending count, ties alphabetical."""
    counts = Counter(token for tokens in tokenize(captions) for token in tokens)
    for special in specials:
        counts.pop(special, None)
    words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
    return Vocabulary([*specials, *words])


def specials_from_config(cfg) -> tuple[str, str, str, str]:
    return (cfg.unk_token, cfg.pad_token, cfg.start_token, cfg.end_token)


def vocabulary_from_config(cfg, train_captions: Sequence[str]) -> Vocabulary:
    """`--vocab_path` if given (a released or saved list), else built from the train captions."""
    if cfg.vocab_path:
        return Vocabulary.load(cfg.vocab_path)
    return build_vocabulary(train_captions, specials_from_config(cfg), cfg.min_freq_caps)
