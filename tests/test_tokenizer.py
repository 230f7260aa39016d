"""PTB tokenisation: the tokens of pycocoevalcap's PTBTokenizer, document by document, in one Java call."""

from __future__ import annotations

import json
import shutil

import pytest
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from evaluation.tokenizer import ptb_tokenize_documents

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")


def pycocoevalcap_tokens(sentences):
    tokenized = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    return [tokenized[i][0] for i in range(len(sentences))]


def test_a_line_depends_on_the_next_one_as_in_pycocoevalcap():
    documents = [
        ["A man writes a capital t.", "The crowd cheers."],
        ["A man writes a capital t.", "the crowd cheers."],
        ["A man writes a capital t."],
        [],
    ]
    tokens = ptb_tokenize_documents(documents)
    assert tokens[0][0] == "a man writes a capital t"  # "t." before a capitalised line: the period splits off
    assert tokens[1][0] == "a man writes a capital t."
    assert tokens[2] == ["a man writes a capital t."]
    assert tokens[3] == []
    assert tokens[:3] == [pycocoevalcap_tokens(d) for d in documents[:3]]


def test_identical_to_pycocoevalcap_on_real_sentences(shared_data):
    references = json.loads((shared_data / "activitynet" / "val_2_no_missings.json").read_text())
    sentences = [s for vid in sorted(references)[:400] for s in references[vid]["sentences"]]
    sentences += ["Line\nbreak and ||| delimiter", "  spaces  ", "(parens) -- dashes ... done!"]
    assert ptb_tokenize_documents([sentences]) == [pycocoevalcap_tokens(sentences)]
