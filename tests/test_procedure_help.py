"""Help per procedure: `--procedure NAME --help` lists the flag groups NAME declares (epoch_loops/procedures.py).

For every procedure and --task variant, a run records every setting the procedure reads (`Config.__getattribute__`
on every Config, the demo's derived ones included) and must read none its help hides. The shared set-up
(`main`, `run_procedure`) is not recorded: what it reads is the common groups (`run`; `task` and `torchrun` where
they apply). Dry runs read only what builds the models, so the converse (the help lists nothing the run leaves
unread) is checked on the real runs, up to a documented few."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datasets.demo import ensure_demo_dataset, ensure_letor_demo, ensure_ranking_demo
from epoch_loops.procedures import PROCEDURES, TASK_PROCEDURES, Procedure, help_groups
from main import GROUPS, build_parser, flags_of, main
from tests.test_letor_transfer import SMALL, released_models
from tests.test_ranking_training import SIZES
from tests.test_train_critic import CAPTIONS, write_csv
from utilities.config import Config

CASES = [(name, None) for name in PROCEDURES] + list(TASK_PROCEDURES)
# These need a trained checkpoint: their run stops at its first input check, having read the settings it needs.
STOPS_AT_INPUT = {("predict", None), ("train_prop", None)}
# Real runs (not dry runs) read every flag their help lists, but these: flags that share a group with what the run
# reads and only matter on another path (data_summary counts missing features rather than skipping them and loads
# no word vectors; --align_fold is the alignment model's fold; the baselines write no per-query cases).
UNREAD_ON_A_REAL_RUN = {
    ("data_summary", None): {"d_model_caps", "word_emb_caps", "skip_missing_features"},
    ("pack_features", None): {"d_vid", "overwrite"},  # an audio pack, to a new --out
    ("export_ranking", None): set(),
    ("letor_baselines", None): {"align_fold", "cases_out", "source_feat_dim", "target_feat_dim"},
    ("eval", "letor"): set(),
    ("pointwise", None): {"margin", "reward_val_triplets", "cases_out"},  # reward's, eval's
    ("reward", None): {"max_tags", "ndcg_empty_ideal", "cases_out"},  # pointwise's and ppo's, eval's
    ("data_summary", "letor"): {"align_fold"},
    ("plot", None): set(),
}


def listed(name: str, task: str | None) -> set[str]:
    return {action.dest for action in flags_of(build_parser(), help_groups(name, task))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("help") / "demo", seed=0, n_train=12, n_val=4)


@pytest.fixture(scope="module")
def letor(tmp_path_factory) -> list[str]:
    """LETOR folds, a (released-layout) alignment model and scorer: the flags eval/baselines/data_summary take."""
    root = tmp_path_factory.mktemp("help_letor")
    paths = ensure_letor_demo(root / "demo", queries=(6, 4, 3, 3), align_target_queries=3)
    align, scorer = released_models()
    torch.save(align.state_dict(), root / "ALIGN.bin")
    torch.save(scorer.state_dict(), root / "SCORER.bin")
    return [*SMALL, "--source_dir", str(paths.source_dir), "--target_dir", str(paths.target_dir),
            "--letor_cache_dir", str(root / "cache"), "--alignment_model_path", str(root / "ALIGN.bin"),
            "--pretrained_model_path", str(root / "SCORER.bin"),
            "--target_test_path", str(paths.target_dir / "Fold1" / "test.txt")]  # fmt: skip


@pytest.fixture(scope="module")
def ranking(tmp_path_factory) -> dict[str, list[str]]:
    """LR2PPO's stage 1 and 2 flags on a tiny ranking demo: one short epoch."""
    paths = ensure_ranking_demo(
        tmp_path_factory.mktemp("help_ranking"), n_source=24, n_target=16, n_val=8, n_test=8
    )
    common = [*SIZES, "--features_h5", str(paths.features_h5), "--dev_path", str(paths.val), "--test_path",
              str(paths.test), "--num_workers", "0", "--learning_rate", "1e-3", "--batch_size", "8", "--epochs_num",
              "1", "--report_steps", "3", "--max_tags", "10", "--reward_val_triplets", "5"]  # fmt: skip
    return {"pointwise": [*common, "--train_path", str(paths.first_stage)],
            "reward": [*common, "--train_path", str(paths.pairs)]}  # fmt: skip


def cheapest_run(
    name: str, task: str | None, demo, letor: list[str], ranking: dict[str, list[str]], tmp_path: Path
) -> list[str]:
    """A run of the procedure that goes as far as it can cheaply: a dry run where it has one, else a real run on
    the demo data, else (where it needs a trained checkpoint) the run up to its first input check."""
    captions = f"--train_meta_path {demo.train_meta_path} --val_1_meta_path {demo.val_1_meta_path} "
    captions += f"--val_2_meta_path {demo.val_2_meta_path} --num_workers 0 "
    captions += (
        f"--video_features_path {demo.video_features_path} --audio_features_path {demo.audio_features_path}"
    )
    agent = f"{captions} --word_emb_caps random --segmenter heuristic --d_model 32 --rl_goal_att_heads 2"
    critic_csv = write_csv(tmp_path / "critic.csv", CAPTIONS)  # captions with clause boundaries
    proposals = tmp_path / "proposals.json"
    references = json.loads(demo.val_1_json.read_text())
    entries = {vid: [{"timestamp": s, "sentence": "", "proposal_score": 1.0} for s in ref["timestamps"]]
               for vid, ref in references.items()}  # fmt: skip
    proposals.write_text(json.dumps({"results": entries}))
    argv = {
        ("demo", None): f"--dry_run --demo_dir {tmp_path / 'demo'}",
        ("eval", None): f"--task proposals --proposals {proposals} --reference_paths {demo.val_1_json}",
        ("data_summary", None): captions,
        ("pack_features", None): f"--features_dir {demo.audio_features_path} --out {tmp_path / 'a.h5'} "
        "--modality audio",
        ("train_critic", None): f"--dry_run --train_meta_path {critic_csv} --val_1_meta_path {critic_csv} "
        "--word_emb_caps random --B 4",
        ("train_rl_cap", None): f"--dry_run {agent}",
        ("train_prop", None): f"--dry_run {agent} --B 4 --anchors_num_audio 8 --anchors_num_video 8",
    }.get((name, task), "--dry_run" if name in ("pointwise", "reward", "ppo") else "").split()
    if task is None and name in ("pointwise", "reward"):  # real runs: one short epoch
        argv = ranking[name]
    if task == "letor" or name == "letor_baselines":
        argv += letor
    if name == "export_ranking":  # the LETOR scorer, into our checkpoint format
        argv += [
            *letor,
            "--task",
            "letor",
            "--export_path",
            str(tmp_path / "ours.pt"),
            "--export_format",
            "ours",
        ]
    if name == "plot":  # a run folder whose metrics hold one learning curve
        (tmp_path / "run").mkdir()
        history = [
            {"step": s, "lr": 0.1, "train": {"loss": 1.0 / s}, "dev": {"NDCG@all": 0.5}} for s in (1, 2)
        ]
        (tmp_path / "run" / "metrics.json").write_text(json.dumps({"history": history}))
        argv += ["--runs", str(tmp_path / "run"), "--out", str(tmp_path / "curves.png")]
    if task is not None:
        argv += ["--task", task]
    return ["--procedure", name, "--log_dir", str(tmp_path / "log"), "--device", "cpu", *argv]


@pytest.mark.parametrize(("name", "task"), CASES, ids=[f"{n}-{t}" if t else n for n, t in CASES])
def test_a_run_reads_only_the_flags_its_help_lists(name, task, demo, letor, ranking, tmp_path, monkeypatch):
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
    status = main(cheapest_run(name, task, demo, letor, ranking, tmp_path))
    assert status == (2 if (name, task) in STOPS_AT_INPUT else 0)
    assert reads <= listed(name, task), sorted(reads - listed(name, task))
    if (name, task) in UNREAD_ON_A_REAL_RUN:  # and the help lists nothing these runs leave unread, but:
        shared = {a.dest for a in flags_of(build_parser(), ("run", "task", "torchrun"))}  # read by the set-up
        assert listed(name, task) - shared - reads == UNREAD_ON_A_REAL_RUN[name, task]


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
