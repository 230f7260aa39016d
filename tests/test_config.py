"""The command line, the Config round trip and run directories."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass

import pytest

from main import build_parser, main
from tests.conftest import REPO
from utilities.config import Config, config_from_argv, settings_for
from utilities.errors import InputError
from utilities.run_dir import RunDir


def parse(*argv: str) -> Config:
    return config_from_argv(build_parser(), list(argv))


def test_config_round_trip_and_explicit_flags_win(tmp_path):
    cfg = parse("--procedure", "eval", "--seed", "3", "--tIoUs", "0.5", "--soda", "--exp_name", "a")
    cfg.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == cfg

    reloaded = parse("--config", str(tmp_path / "config.json"), "--seed", "7", "--no-soda")
    assert reloaded.seed == 7 and reloaded.soda is False
    assert reloaded.tIoUs == [0.5] and reloaded.procedure == "eval"


def test_run_names_are_never_reloaded(tmp_path):
    saved = {"procedure": "eval", "exp_name": "a", "resume": "a/checkpoints/last.pt", "config": "x.json"}
    (tmp_path / "c.json").write_text(json.dumps(saved))
    cfg = parse("--config", str(tmp_path / "c.json"))
    assert cfg.exp_name is None and cfg.resume is None and cfg.config == str(tmp_path / "c.json")
    assert parse("--config", str(tmp_path / "c.json"), "--exp_name", "b").exp_name == "b"


def test_saved_config_fills_flags_not_given(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"procedure": "eval", "max_prop_per_vid": 7, "obsolete": 1}))
    cfg = parse("--config", str(tmp_path / "c.json"))
    assert cfg.max_prop_per_vid == 7 and cfg.seed == 0 and not hasattr(cfg, "obsolete")


@pytest.mark.parametrize("flag", ["--no-soda", "--no_soda"])
def test_booleans_are_real_booleans(flag):
    assert parse("--procedure", "eval", "--soda").soda is True
    assert parse("--procedure", "eval", "--soda", flag).soda is False
    assert parse("--procedure", "eval").soda is False


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--rl_train_worker", "False"], False),
        (["--rl_train_worker", "True"], True),
        (["--rl_stabilize", "true"], True),
        (["--rl_stabilize", "FALSE"], False),
        (["--rl_stabilize=True"], True),
    ],
)
def test_booleans_accept_the_originals_true_false_values(argv, expected):
    """BMHRL's README passes `--rl_train_worker True` (a `type=bool` flag there, where `False` was True)."""
    flag = argv[0].split("=")[0][2:]
    cfg = parse("--procedure", "train_rl_cap", *argv, "--B", "4")
    assert getattr(cfg, flag) is expected and cfg.B == 4


def test_config_takes_a_run_folder(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"procedure": "eval", "max_prop_per_vid": 7}))
    assert parse("--config", str(tmp_path / "run")).max_prop_per_vid == 7
    with pytest.raises(SystemExit):
        parse("--config", str(tmp_path))
    err = capsys.readouterr().err
    assert f"--config {tmp_path}: a folder without config.json" in err and err.count("\n") == 1


def test_a_mistyped_procedure_in_a_config_file_names_the_nearest(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"procedure": "train_rl_cpa"}))
    with pytest.raises(SystemExit):
        parse("--config", str(tmp_path / "c.json"))
    assert "procedure 'train_rl_cpa': did you mean train_rl_cap? expected one of " in capsys.readouterr().err


def run_main(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "main.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_procedures():
    result = run_main("--help")
    assert result.returncode == 0
    for name in ("eval", "data_summary", "pack_features", "demo"):
        assert name in result.stdout
    per_procedure = run_main("--procedure", "eval", "--help")
    assert per_procedure.returncode == 0
    for group in ("run:", "evaluation:", "metrics:"):
        assert f"\n{group}\n" in per_procedure.stdout


def test_help_shows_the_default_of_every_flag():
    parser = build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.default is not argparse.SUPPRESS]
    assert not [a.dest for a in flags if not a.help], "argparse prints no default for a flag without help"
    assert parser.format_help().count("(default:") == len(flags)
    # BoolFlag shows every form and its default
    assert "--soda [true|false], --no-soda, --no_soda" in parser.format_help()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--procedure", "nonsense"], "invalid choice: 'nonsense'"),
        (["--procedure", "eval", "--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
        (["--procedure", "eval", "--bogus_flag"], "unrecognized argument --bogus_flag (see --help)"),
        (
            ["--procedure", "eval", "--submisson", "p.json"],
            "unrecognized argument --submisson (did you mean --submission?)",
        ),
        (
            ["--procedure", "trian_rl_cap"],
            "invalid choice: 'trian_rl_cap' (did you mean train_rl_cap? choose",
        ),
        (
            ["--procedure", "eval", "--task", "rankng"],
            "invalid choice: 'rankng' (did you mean ranking? choose",
        ),
        (["--procedure", "eval", "--soda", "maybe"], "argument --soda: expected true or false (or no value)"),
        (["--procedure", "eval", "--no-soda", "False"], "argument --no-soda: takes no value, got False"),
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
    with pytest.raises(InputError, match="already exists"), RunDir.open(cfg):
        pass


def test_run_dir_appears_with_the_first_write(tmp_path):
    cfg = parse("--procedure", "eval", "--log_dir", str(tmp_path), "--exp_name", "lazy")
    with RunDir.open(cfg) as run:
        assert run.path == tmp_path / "eval" / "lazy" and not run.path.exists()
    assert not (tmp_path / "eval").exists()
    with RunDir.open(cfg) as run:
        cfg.device = "cpu"  # what run_procedure resolves after opening: config.json keeps what was given
        (run.checkpoints / "last.pt").write_bytes(b"x")
    assert Config.load(tmp_path / "eval" / "lazy" / "config.json").device == "auto"


def test_a_run_that_fails_on_its_input_leaves_no_directory(tmp_path):
    result = run_main("--procedure", "eval", "--log_dir", str(tmp_path))
    assert result.returncode == 2 and "needs --submission" in result.stderr
    missing = run_main("--procedure", "eval", "--log_dir", str(tmp_path), "--submission", str(tmp_path / "p"))
    assert missing.returncode == 2 and "file not found" in missing.stderr
    assert list(tmp_path.iterdir()) == []


def write_tiny_csvs(folder) -> list[str]:
    header = "video_id\tcaption\tstart\tend\tduration\tphase\tidx\n"
    flags = []
    for split in ("train", "val_1", "val_2"):
        path = folder / f"{split}.csv"
        path.write_text(header + f"v_a\ta man runs\t0.0\t5.0\t10.0\t{split}\t0\n")
        flags += [f"--{split}_meta_path", str(path)]
    return flags


def test_saved_config_reloads_through_main(tmp_path):
    """The documented reload, end to end: a second run from the first run's config.json gets its own
    directory and the same settings; the device is saved as given ('auto'), so the file works on any box."""
    log_dir = tmp_path / "log"
    argv = ["--procedure", "data_summary", "--log_dir", str(log_dir), "--min_freq_caps", "2"]
    first = run_main(*argv, *write_tiny_csvs(tmp_path), "--exp_name", "first", "--modality", "audio")
    assert first.returncode == 0, first.stderr
    saved = json.loads((log_dir / "data_summary" / "first" / "config.json").read_text())
    assert saved["device"] == "auto" and saved["min_freq_caps"] == 2

    second = run_main("--config", str(log_dir / "data_summary" / "first" / "config.json"))
    assert second.returncode == 0, second.stderr
    runs = sorted(p.name for p in (log_dir / "data_summary").iterdir())
    assert len(runs) == 2 and "first" in runs
    resaved = json.loads((log_dir / "data_summary" / runs[0] / "config.json").read_text())
    assert {k: v for k, v in resaved.items() if k not in ("exp_name", "config")} == {
        k: v for k, v in saved.items() if k not in ("exp_name", "config")
    }
    summaries = [json.loads((log_dir / "data_summary" / r / "data_summary.json").read_text()) for r in runs]
    assert summaries[0] == summaries[1]


def test_unavailable_device_is_a_one_line_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    (tmp_path / "c.json").write_text(json.dumps({"procedure": "data_summary", "device": "cuda:0"}))
    result = run_main("--config", str(tmp_path / "c.json"), "--log_dir", str(tmp_path / "log"))
    assert result.returncode == 2 and "--device cuda:0 requested but CUDA is not available" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "log").exists()


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


def test_settings_for_reads_fields_by_name_and_leaves_missing_ones_to_the_defaults():
    @dataclass
    class Sizes:
        d_model: int = 1024
        dout_p: float = 0.1

    cfg = Config(d_model=64, procedure="demo")  # no dout_p; procedure is not a field
    assert settings_for(Sizes, cfg) == {"d_model": 64}
    assert Sizes(**settings_for(Sizes, cfg)) == Sizes(d_model=64, dout_p=0.1)
    assert settings_for(Sizes, argparse.Namespace(d_model=8, dout_p=0.0)) == {"d_model": 8, "dout_p": 0.0}


BAD_VALUES = [
    ("--B", "0", "a positive integer"),
    ("--inf_B_coeff", "0", "a positive integer"),
    ("--max_len", "0", "a positive integer"),
    ("--batch_size", "-1", "a positive integer"),
    ("--minibatch_size", "0", "a positive integer"),
    ("--report_steps", "0", "a positive integer"),
    ("--epochs_num", "0", "a positive integer"),
    ("--epoch_num", "0", "a positive integer"),
    ("--rl_warmstart_epochs", "-1", "a non-negative integer"),
    ("--max_tags", "0", "a positive integer"),
    ("--max_imgs", "0", "a positive integer"),
    ("--seq_length", "0", "a positive integer"),
    ("--rl_samples", "0", "a positive integer"),
    ("--beam_size", "0", "a positive integer"),
    ("--update_timesteps", "0", "a positive integer"),
    ("--ppo_epochs", "0", "a positive integer"),
    ("--num_workers", "-1", "a non-negative integer"),
    ("--max_prop_per_vid", "0", "a positive integer"),
    ("--reward_val_triplets", "0", "a positive integer"),
    ("--d_model", "0", "a positive integer"),
    ("--rl_att_heads", "0", "a positive integer"),
    ("--xit_heads", "0", "a positive integer"),
    ("--visual_feat_dim", "2.5", "a positive integer"),
    ("--dout_p", "1", "a number in [0, 1)"),
    ("--xit_dropout", "-0.1", "a number in [0, 1)"),
    ("--smoothing", "1.5", "a number in [0, 1)"),
    ("--rl_cap_lr", "0", "a positive number"),
    ("--learning_rate", "-0.00001", "a positive number"),
    ("--critic_lr", "nan", "a positive number"),
    ("--grad_clip", "0", "a positive number"),
    ("--grad_clip", "inf", "a positive number"),
    ("--rl_gamma_manager", "1.5", "a number in [0, 1]"),
    ("--rl_gamma_worker", "-0.1", "a number in [0, 1]"),
    ("--rl_critic_score_threshhold", "2", "a number in [0, 1]"),
    ("--tIoUs", "0", "a number in (0, 1]"),
    ("--lr_reduce_factor", "1", "a number in (0, 1)"),
    ("--early_stop_after", "0", "a positive integer"),
    ("--duration", "0", "a positive number"),
    ("--warmup", "1.5", "a number in [0, 1]"),
    ("--weight_decay", "-1", "a non-negative number"),
    ("--advantage_threshold", "nan", "a finite number"),
]


@pytest.mark.parametrize(("flag", "value", "description"), BAD_VALUES)
def test_out_of_range_values_are_refused_at_parse_time(flag, value, description, capsys):
    with pytest.raises(SystemExit) as stop:
        parse("--procedure", "train_rl_cap", flag, value)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == f"main.py: error: argument {flag}: must be {description}, got {value} (see --help)\n"


def test_every_numeric_flag_has_a_range():
    """A new numeric flag must decide its range: only --seed (any integer) and choices are plain int/float."""
    plain = [
        a.dest
        for a in build_parser()._actions
        if a.type in (int, float) and a.choices is None and a.dest != "seed"
    ]
    assert plain == []


def test_a_config_file_is_held_to_the_same_ranges(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"procedure": "train_rl_cap", "max_len": 0}))
    with pytest.raises(SystemExit):
        parse("--config", str(tmp_path / "c.json"))
    err = capsys.readouterr().err
    assert "max_len 0: must be a positive integer, got 0" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--d_model", "30", "--rl_att_heads", "4"], "--d_model 30 is not divisible by --rl_att_heads 4"),
        (
            ["--d_model", "30", "--rl_att_heads", "3", "--rl_goal_att_heads", "4"],
            "--d_model 30 is not divisible by --rl_goal_att_heads 4",
        ),
        (
            ["--visual_feat_dim", "100", "--xit_heads", "8"],
            "--visual_feat_dim 100 is not divisible by --xit_heads 8",
        ),
    ],
)
def test_heads_that_do_not_divide_their_width_are_refused_before_any_work(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--procedure", "train_rl_cap", "--log_dir", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())
