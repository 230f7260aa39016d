"""The troubleshooting table (docs/troubleshooting.md): what a new user gets wrong gives one line from main.py, no traceback.
Each case is a file of the wrong kind where the command line expects another."""

from __future__ import annotations

import pytest
import torch

from main import main
from utilities.checkpoint import load_checkpoint
from utilities.errors import InputError

BINARY = b"\xfe\xff" + bytes(range(200))


@pytest.fixture
def files(tmp_path):
    (tmp_path / "binary.txt").write_bytes(BINARY)
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    sentences = ", ".join(['"a man runs"'] * 100)  # a reference JSON: one long line
    (tmp_path / "annotations.json").write_text(
        f'{{"v_1": {{"timestamps": [[0, 1]], "sentences": [{sentences}]}}}}\n'
    )
    (tmp_path / "table.zip").write_text("a,b\n1,2\n")
    (tmp_path / "one_column.txt").write_text("a\nb\n")
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--vocab_path", "binary.txt"],
            "binary.txt: not UTF-8 text (byte 0xfe at offset 0)",
        ),
        (["--vocab_path", "folder"], "folder: cannot read: Is a directory"),
        (
            ["--train_meta_path", "binary.txt"],
            "binary.txt: not UTF-8 text (byte 0xfe at offset 0)",
        ),
        (
            ["--train_meta_path", "annotations.json"],
            "annotations.json: line 1: expected the tab-separated header",
        ),
        (
            ["--segmenter", "critic", "--rl_critic_path", "table.csv"],
            "table.csv: corrupt or truncated checkpoint",
        ),
        (
            ["--video_features_path", "table.csv"],
            "table.csv: a file, but video features are a directory of .npy",
        ),
        (["--procedure", "demo", "--demo_dir", "table.csv"], "table.csv: a file, not a folder; --demo_dir"),
        (
            ["--word_emb_caps", "table.zip"],
            "table.zip: not a zip archive (expected GloVe's .zip, or its .txt)",
        ),
        (["--word_emb_caps", "one_column.txt"], "one_column.txt: line 1: not GloVe text"),
    ],
)
def test_a_file_of_the_wrong_kind_is_one_line(files, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(files)
    (files / "train.csv").write_text(
        "video_id\tcaption\tstart\tend\tduration\tphase\tidx\nv_1\ta man runs\t0\t1\t10\ttrain\t0\n"
    )
    argv = ["--procedure", "train_rl_cap", "--train_meta_path", "train.csv", "--word_emb_caps", "random"]
    argv += ["--segmenter", "heuristic", "--num_workers", "0", "--log_dir", "log", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"main.py: error: {message}") and err.count("\n") == 1, err
    assert len(err) < 400, "a quoted file line is shortened"


def test_a_text_file_given_as_a_checkpoint_is_an_input_error(tmp_path):
    (tmp_path / "notes.txt").write_text("a,b\n")
    with pytest.raises(InputError, match=r"notes\.txt: corrupt or truncated checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "ok.pt")
    assert set(load_checkpoint(tmp_path / "ok.pt")) == {"x"}
