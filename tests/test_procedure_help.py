"""Help per procedure: `--procedure NAME --help` lists the flag groups NAME declares (epoch_loops/procedures.py),
and a run of NAME reads no setting outside them, checked by recording every setting a run reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datasets.demo import ensure_demo_dataset
from epoch_loops.procedures import PROCEDURES, TASK_PROCEDURES, Procedure, help_groups
from main import GROUPS, build_parser, flags_of, main
from tests.test_train_critic import CAPTIONS, write_csv
from utilities.config import Config

CASES = [(name, None) for name in PROCEDURES] + list(TASK_PROCEDURES)
# These need a trained checkpoint or the LETOR files: their run stops at its first input check, having read the
# settings that check needs.
STOPS_AT_INPUT = {("predict", None), ("export_ranking", None), ("train_prop", None), ("letor_baselines", None), ("eval", "letor"),
                  ("data_summary", "letor")}  # fmt: skip


def listed(name: str, task: str | None) -> set[str]:
    return {action.dest for action in flags_of(build_parser(), help_groups(name, task))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("help") / "demo", seed=0, n_train=12, n_val=4)


def cheapest_run(name: str, task: str | None, demo, tmp_path: Path) -> list[str]:
    """A run of the procedure that goes as far as it can cheaply: a dry run where it has one, else a real run on
    the demo data, else (where it needs a trained checkpoint) the run up to its first input check."""
    captions = [
        "--train_meta_path",
        str(demo.train_meta_path),
        "--val_1_meta_path",
        str(demo.val_1_meta_path),
    ]
    captions += ["--val_2_meta_path", str(demo.val_2_meta_path), "--num_workers", "0"]
    features = ["--video_features_path", str(demo.video_features_path)]
    features += ["--audio_features_path", str(demo.audio_features_path)]
    agent = [
        "--word_emb_caps",
        "random",
        "--segmenter",
        "heuristic",
        "--d_model",
        "32",
        "--rl_goal_att_heads",
        "2",
    ]
    critic_csv = write_csv(tmp_path / "critic.csv", CAPTIONS)  # captions with clause boundaries
    proposals = tmp_path / "proposals.json"
    references = json.loads(demo.val_1_json.read_text())
    proposals.write_text(json.dumps({"results": {vid: [{"timestamp": s, "sentence": "", "proposal_score": 1.0} for s in ref["timestamps"]]
                                                 for vid, ref in references.items()}}))  # fmt: skip
    argv = {
        "demo": ["--dry_run", "--demo_dir", str(tmp_path / "demo")],
        "eval": [
            "--task",
            "proposals",
            "--proposals",
            str(proposals),
            "--reference_paths",
            str(demo.val_1_json),
        ],
        "data_summary": [*captions, *features],
        "pack_features": [
            "--features_dir",
            str(demo.audio_features_path),
            "--out",
            str(tmp_path / "a.h5"),
            "--modality",
            "audio",
        ],
        "train_critic": [
            "--dry_run",
            "--train_meta_path",
            str(critic_csv),
            "--val_1_meta_path",
            str(critic_csv),
            "--word_emb_caps",
            "random",
            "--B",
            "4",
        ],
        "train_rl_cap": ["--dry_run", *captions, *features, *agent],
        "train_prop": [
            "--dry_run",
            *captions,
            *features,
            *agent,
            "--B",
            "4",
            "--anchors_num_audio",
            "8",
            "--anchors_num_video",
            "8",
        ],
    }.get(name if task is None else "", ["--dry_run"] if name in ("pointwise", "reward", "ppo") else [])
    if task is not None:
        argv = [*argv, "--task", task]
    return ["--procedure", name, "--log_dir", str(tmp_path / "log"), "--device", "cpu", *argv]


@pytest.mark.parametrize(("name", "task"), CASES, ids=[f"{n}-{t}" if t else n for n, t in CASES])
def test_a_run_reads_only_the_flags_its_help_lists(name, task, demo, tmp_path, monkeypatch):
    reads: set[str] = set()
    original, function = Config.__getattribute__, Procedure.function

    def recording(self, attribute):
        if attribute in original(self, "__dict__") and not attribute.startswith("_"):
            reads.add(attribute)
        return original(self, attribute)

    def recorded(spec):  # the procedure's own reads: the shared set-up reads the common groups
        def run(cfg, run_dir):
            monkeypatch.setattr(Config, "__getattribute__", recording)
            try:
                function(spec)(cfg, run_dir)
            finally:
                monkeypatch.setattr(Config, "__getattribute__", original)

        return run

    monkeypatch.setattr(Procedure, "function", recorded)
    status = main(cheapest_run(name, task, demo, tmp_path))
    assert status == (2 if (name, task) in STOPS_AT_INPUT else 0)
    assert reads <= listed(name, task), sorted(reads - listed(name, task))


def test_every_flag_is_read_by_some_procedure_and_every_declared_group_exists():
    everything = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert set().union(*(listed(name, task) for name, task in CASES)) == everything
    for name, task in CASES:
        assert set(help_groups(name, task)) <= set(GROUPS), (name, task)


@pytest.mark.parametrize(("name", "task"), CASES, ids=[f"{n}-{t}" if t else n for n, t in CASES])
def test_procedure_help_prints_exactly_its_flags(name, task, capsys):
    assert main(["--procedure", name, *(["--task", task] if task else []), "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: main.py --procedure {name}")
    shown = {line.split()[0].lstrip("-") for line in text.splitlines() if line.startswith("  --")}
    assert shown == listed(name, task)


def test_procedure_help_of_the_rl_captioner(capsys):
    assert main(["--help", "--procedure", "train_rl_cap"]) == 0
    text = capsys.readouterr().out
    for flag in ("--rl_samples", "--rl_train_worker [true|false]", "--B B", "--dist_timeout", "--resume"):
        assert flag in text
    for flag in ("--learning_rate", "--ppo_objective", "--critic_lr", "--features_dir", "--video_id"):
        assert flag not in text
    assert "(default: 0.7)" in text  # --smoothing


def test_help_without_a_procedure_lists_them_with_a_line_each(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for name, spec in PROCEDURES.items():
        assert f"  {name} " in text and spec.summary in text
    assert "--procedure NAME --help lists the flags NAME reads" in text
    assert len(text.splitlines()) < 30


def test_a_flag_the_procedure_does_not_read_warns_once_unless_it_comes_from_a_config(tmp_path, capsys):
    argv = ["--procedure", "eval", "--log_dir", str(tmp_path), "--submission", str(tmp_path / "none.json")]
    assert main([*argv, "--B", "4", "--learning_rate", "0.1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "main.py: warning: --procedure eval does not read --B, --learning_rate (ignored; see --procedure eval --help)"
    )
    Config(procedure="eval", B=4, learning_rate=0.1).save(tmp_path / "c.json")
    assert main([*argv, "--config", str(tmp_path / "c.json")]) == 2
    assert "warning" not in capsys.readouterr().err
