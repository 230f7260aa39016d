"""The command line, the Config round trip and run directories."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from main import build_parser
from tests.conftest import REPO
from utilities.config import Config, config_from_argv
from utilities.run_dir import RunDir


def parse(*argv: str) -> Config:
    return config_from_argv(build_parser(), list(argv))


def test_config_round_trip_and_explicit_flags_win(tmp_path):
    cfg = parse("--procedure", "eval", "--seed", "3", "--tIoUs", "0.5", "--soda", "--exp_name", "a")
    cfg.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == cfg

    reloaded = parse("--config", str(tmp_path / "config.json"), "--seed", "7", "--no-soda")
    assert reloaded.seed == 7 and reloaded.soda is False
    assert reloaded.tIoUs == [0.5] and reloaded.procedure == "eval" and reloaded.exp_name == "a"


def test_saved_config_fills_flags_not_given(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"procedure": "eval", "max_prop_per_vid": 7, "obsolete": 1}))
    cfg = parse("--config", str(tmp_path / "c.json"))
    assert cfg.max_prop_per_vid == 7 and cfg.seed == 0 and not hasattr(cfg, "obsolete")


@pytest.mark.parametrize("flag", ["--no-soda", "--no_soda"])
def test_booleans_are_real_booleans(flag):
    assert parse("--procedure", "eval", "--soda").soda is True
    assert parse("--procedure", "eval", "--soda", flag).soda is False
    assert parse("--procedure", "eval").soda is False


def run_main(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "main.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_procedures():
    result = run_main("--help")
    assert result.returncode == 0
    for name in ("eval", "data_summary", "pack_features", "demo"):
        assert name in result.stdout
    for group in ("data:", "model:", "training:", "evaluation:", "logging:"):
        assert group in result.stdout


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--procedure", "nonsense"], "invalid choice: 'nonsense'"),
        (["--procedure", "eval", "--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
        (["--procedure", "eval", "--bogus_flag"], "unrecognized arguments: --bogus_flag"),
        ([], "the following arguments are required: --procedure"),
    ],
)
def test_bad_flags_give_a_one_line_error(argv, expected):
    result = run_main(*argv)
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_bad_config_file_is_a_one_line_error(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    result = run_main("--config", str(tmp_path / "c.json"))
    assert result.returncode == 2 and "not valid JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_dir_saves_config_and_never_overwrites(tmp_path):
    cfg = parse("--procedure", "eval", "--log_dir", str(tmp_path), "--exp_name", "first")
    with RunDir.open(cfg) as run:
        assert run.path == tmp_path / "eval" / "first"
        run.write_json("metrics.json", {"METEOR": 0.1})
    assert Config.load(tmp_path / "eval" / "first" / "config.json") == cfg
    with pytest.raises(SystemExit, match="already exists"), RunDir.open(cfg):
        pass


def test_resume_reopens_its_own_run_dir(tmp_path):
    cfg = parse("--procedure", "eval", "--log_dir", str(tmp_path), "--exp_name", "r")
    with RunDir.open(cfg) as run:
        (run.checkpoints / "last.pt").write_bytes(b"x")
    cfg.resume = str(tmp_path / "eval" / "r" / "checkpoints" / "last.pt")
    with RunDir.open(cfg) as run:
        assert run.path == tmp_path / "eval" / "r"


def test_default_exp_names_are_timestamps_and_distinct(tmp_path):
    names = []
    for _ in range(2):
        cfg = parse("--procedure", "eval", "--log_dir", str(tmp_path))
        with RunDir.open(cfg) as run:
            run.write_json("m.json", {})
            names.append(cfg.exp_name)
    assert names[0] != names[1] and names[0][:12].isdigit()
