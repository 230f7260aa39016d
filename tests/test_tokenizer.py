"""PTB tokenisation: the tokens of pycocoevalcap's PTBTokenizer, document by document, in one Java call."""

from __future__ import annotations

import json

import pytest
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from evaluation.tokenizer import ptb_tokenize_documents
from tests.conftest import requires_java

pytestmark = requires_java


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


def test_line_breaks_and_separators_never_shift_lines():
    sentences = ["a man\x0cruns", "the dog\x0bbarks", "x\x1cy\x1dz\x1e", "n\x85e\u2028l\u2029s\rr", "end"]
    assert ptb_tokenize_documents([sentences]) == [
        ["a man runs", "the dog barks", "x y z", "n e l s r", "end"]
    ]


def test_a_missing_or_extra_output_line_is_an_error(monkeypatch):
    import evaluation.tokenizer as tokenizer

    monkeypatch.setattr(tokenizer, "one_line", lambda s: s)  # let a form feed through to Java
    with pytest.raises(tokenizer.JavaError, match="returned 4 lines for 3 sentences"):
        ptb_tokenize_documents([["a man\x0cruns", "the dog barks", "end"]])


def test_empty_sentences_keep_their_lines():
    assert ptb_tokenize_documents([["a", ""], ["", "b"], [""]]) == [["a", ""], ["", "b"], [""]]
