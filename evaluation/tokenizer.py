"""PTB tokenisation exactly as pycocoevalcap's `PTBTokenizer` does it, for many documents in one Java call.

pycocoevalcap runs Stanford CoreNLP 3.4.1's PTBTokenizer (`-preserveLines -lowerCase`) on a file with one
sentence per line (no final newline) and then drops punctuation tokens. The tokens of a line can depend on the
next line: "a capital t." keeps "t." before a lower-case line or the end of the file, but splits off the period
before a capitalised line. So the official evaluator's numbers depend on which sentences share a tokenizer call
and in what order; `ptb_tokenize_documents` keeps each call's document intact and tokenises every document as a
file of its own (`-ioFileList`) in a single JVM.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pycocoevalcap.tokenizer.ptbtokenizer as _pycoco_ptb

from evaluation.meteor import JavaError, java_executable, one_line

CORENLP_JAR = Path(_pycoco_ptb.__file__).with_name("stanford-corenlp-3.4.1.jar")
PUNCTUATIONS = frozenset(_pycoco_ptb.PUNCTUATIONS)


def ptb_tokenize_documents(
    documents: Sequence[Sequence[str]], java: str | None = None, timeout: float = 600.0
) -> list[list[str]]:
    """Tokenise each document as one pycocoevalcap `PTBTokenizer.tokenize` call would: a list of token
    strings per document (lower-case, space-joined, punctuation removed)."""
    tokenized: list[list[str]] = [[] for _ in documents]
    todo = [i for i, document in enumerate(documents) if document]
    if not todo:
        return tokenized
    with tempfile.TemporaryDirectory(prefix="ptb_") as tmp:
        folder = Path(tmp)
        listing = []
        for i in todo:
            # pycocoevalcap replaces newlines by spaces; Java also ends a line at \r, \x0b, \x0c, ...
            text = "\n".join(one_line(s) for s in documents[i])
            (folder / f"{i}.txt").write_bytes(text.encode())
            listing.append(f"{folder / f'{i}.txt'}\t{folder / f'{i}.tok'}")
        (folder / "files.txt").write_text("\n".join(listing) + "\n")
        # A short run: the quick (C1) compiler and the serial collector cut its time about threefold. METEOR's
        # JVM loads meanwhile, for longer, so the tokenizer also yields the CPU to it (`nice`). The tokens do
        # not depend on either.
        java_path = java_executable(java)
        cmd = [java_path, "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-cp", str(CORENLP_JAR)]
        cmd.append("edu.stanford.nlp.process.PTBTokenizer")
        if shutil.which("nice"):
            cmd = ["nice", "-n", "10", *cmd]
        cmd += ["-preserveLines", "-lowerCase", "-ioFileList", str(folder / "files.txt")]
        try:
            done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise JavaError(f"the PTB tokenizer did not finish within {timeout:g} s") from None
        except OSError as e:
            raise JavaError(f"could not start the PTB tokenizer ({java_path}): {e}") from None
        stderr = done.stderr.decode(errors="replace").strip()
        if done.returncode != 0:
            raise JavaError(
                f"the PTB tokenizer failed (exit code {done.returncode}); stderr: {stderr or '(empty)'}"
            )
        for i in todo:
            output = folder / f"{i}.tok"
            lines = output.read_bytes().decode().split("\n") if output.is_file() else []
            if len(lines) != len(documents[i]):
                raise JavaError(
                    f"the PTB tokenizer returned {len(lines)} lines for {len(documents[i])} sentences: {stderr}"
                )
            tokenized[i] = [
                " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS) for line in lines
            ]
    return tokenized
