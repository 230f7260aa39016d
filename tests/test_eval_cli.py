"""`main.py --procedure eval`: the metrics JSON layout, the printed table and provenance, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from main import main
from tests.conftest import REPO, requires_java

pytestmark = requires_java
METRICS = [
    "Bleu_1",
    "Bleu_2",
    "Bleu_3",
    "Bleu_4",
    "METEOR",
    "ROUGE_L",
    "CIDEr",
    "Precision",
    "Recall",
    "SODA_c",
]


def write(path, content):
    path.write_text(json.dumps(content))
    return str(path)


def test_cli_writes_metrics_and_prints_table(tmp_path, capsys):
    reference = write(
        tmp_path / "ref.json",
        {
            "v1": {
                "duration": 20,
                "timestamps": [[0, 10], [10, 20]],
                "sentences": ["A man runs.", "He jumps high."],
            }
        },
    )
    submission = write(
        tmp_path / "sub.json",
        {
            "version": "VERSION 1.0",
            "external_data": {"used": False},
            "results": {
                "v1": [
                    {"sentence": "a man is running", "timestamp": [0, 9]},
                    {"sentence": "he jumps", "timestamp": [10, 20]},
                ],
                "other": [{"sentence": "x", "timestamp": [0, 1]}],
            },
        },
    )
    out = tmp_path / "metrics.json"
    argv = [
        "--procedure",
        "eval",
        "--submission",
        submission,
        "--reference_paths",
        reference,
        "--tIoUs",
        "0.5",
        "0.9",
    ]
    argv += ["--soda", "--metrics_out", str(out), "--log_dir", str(tmp_path / "log"), "--exp_name", "e"]
    assert main(argv) == 0
    metrics = json.loads(out.read_text())
    assert list(metrics) == ["0.5", "0.9", "Average across tIoUs"]
    for row in metrics.values():
        assert list(row) == METRICS and all(0 <= v <= 1 for m, v in row.items() if m != "CIDEr")
    assert metrics["0.5"]["Precision"] == 1.0 and metrics["0.9"]["Precision"] == 0.5
    assert metrics["Average across tIoUs"]["Precision"] == 0.75
    assert json.loads((tmp_path / "log" / "eval" / "e" / "metrics.json").read_text()) == metrics
    printed = capsys.readouterr().out
    assert "reference videos: 1" in printed and "1 predictions of 1 videos" in printed
    assert "Average across tIoUs |" in printed and "75.0000" in printed


def test_cli_bad_submission_is_one_line_error(tmp_path, capsys):
    reference = write(tmp_path / "ref.json", {"v1": {"timestamps": [[0, 10]], "sentences": ["a"]}})
    submission = write(tmp_path / "sub.json", {"results": {"v1": [{"sentence": "a", "timestamp": [0, "x"]}]}})
    argv = ["--procedure", "eval", "--submission", submission, "--reference_paths", reference]
    assert main([*argv, "--log_dir", str(tmp_path / "log")]) == 2
    err = capsys.readouterr().err
    assert "video 'v1', prediction 0" in err and "Traceback" not in err


def test_cli_missing_java_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMRL_JAVA", "/nonexistent/java")
    reference = write(tmp_path / "ref.json", {"v1": {"timestamps": [[0, 10]], "sentences": ["a"]}})
    submission = write(tmp_path / "sub.json", {"results": {"v1": [{"sentence": "a", "timestamp": [0, 10]}]}})
    argv = ["--procedure", "eval", "--submission", submission, "--reference_paths", reference]
    assert main([*argv, "--log_dir", str(tmp_path / "log")]) == 2
    assert "Java executable '/nonexistent/java' not found" in capsys.readouterr().err


def test_cli_duplicate_tious_are_rejected(tmp_path, capsys):
    reference = write(tmp_path / "ref.json", {"v1": {"timestamps": [[0, 10]], "sentences": ["a"]}})
    submission = write(tmp_path / "sub.json", {"results": {"v1": [{"sentence": "a", "timestamp": [0, 10]}]}})
    argv = ["--procedure", "eval", "--submission", submission, "--reference_paths", reference]
    assert main([*argv, "--tIoUs", "0.5", "0.7", "0.5", "--log_dir", str(tmp_path / "log")]) == 2
    assert "duplicate tIoUs [0.5]" in capsys.readouterr().err


def test_cli_crashing_java_is_reported_as_what_happened(tmp_path, capsys, monkeypatch):
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\necho 'Error: could not reserve heap' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("MMRL_JAVA", str(fake))
    reference = write(tmp_path / "ref.json", {"v1": {"timestamps": [[0, 10]], "sentences": ["a"]}})
    submission = write(tmp_path / "sub.json", {"results": {"v1": [{"sentence": "a", "timestamp": [0, 10]}]}})
    argv = ["--procedure", "eval", "--submission", submission, "--reference_paths", reference]
    assert main([*argv, "--log_dir", str(tmp_path / "log")]) == 2
    err = capsys.readouterr().err
    assert "could not reserve heap" in err and "needs Java" not in err and "Traceback" not in err


def test_cli_eval_does_not_import_torch(tmp_path):
    """`eval` runs every epoch and in scripts: it must not pay torch's second of import time."""
    reference = write(tmp_path / "ref.json", {"v1": {"timestamps": [[0, 10]], "sentences": ["a man"]}})
    submission = write(
        tmp_path / "sub.json", {"results": {"v1": [{"sentence": "a man", "timestamp": [0, 9]}]}}
    )
    argv = ["--procedure", "eval", "--submission", submission, "--reference_paths", reference]
    argv += ["--log_dir", str(tmp_path / "log")]
    code = f"import sys; from main import main; assert main({argv!r}) == 0; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("False")
