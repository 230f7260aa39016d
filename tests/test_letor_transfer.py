"""LR²PPO's LETOR transfer experiment (epoch_loops/ranking/letor.py): the fold layout and packed cache, the
datasets of the stages, the pinned evaluation interface, the dry-run parameter counts, the bad-input errors, the
stages from main.py on generated folds, and LightGBM on real MQ2008 rows."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.demo import ensure_letor_demo
from datasets.ranking.letor import (
    QueryComparisons,
    QueryLists,
    QueryPairs,
    fold_files,
    load_split,
    pack,
    read_letor,
)
from datasets.ranking.lrmovienet import collate_labels
from evaluation.ranking import clip_ndcg
from main import main
from model.ranking.scorer import LabelRankingConfig
from utilities.errors import InputError

SMALL = ["--visual_feat_dim", "8", "--feedforward_size", "16", "--xit_heads", "2", "--num_workers", "0"]
SMALL += ["--device", "cpu", "--no-progress"]


def write_split(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            f"{label} qid:{qid} " + " ".join(f"{i + 1}:{v}" for i, v in enumerate(x)) + "\n"
            for label, qid, x in rows
        )
    )


# --- data ---------------------------------------------------------------------------------------------------------


def test_fold_without_test_txt_names_the_file(tmp_path):
    for split in ("train", "vali"):
        write_split(tmp_path / "Fold1" / f"{split}.txt", [(1, 1, [0.5])])
    with pytest.raises(InputError, match=r"Fold1/test.txt: not found"):
        fold_files(tmp_path, "Fold1")


def test_packed_cache_is_reused_until_the_file_changes(tmp_path):
    source = tmp_path / "train.txt"
    write_split(source, [(2, 7, [1, 2]), (0, 7, [3, 4]), (1, 3, [5, 6])])
    first = load_split(source, 2, tmp_path / "cache")
    assert first.qids == ("7", "3") and first.offsets.tolist() == [0, 2, 3]
    np.testing.assert_array_equal(first.features, [[1, 2], [3, 4], [5, 6]])
    (cache,) = (tmp_path / "cache").iterdir()
    stamp = cache.stat().st_mtime_ns
    again = load_split(source, 2, tmp_path / "cache")
    assert cache.stat().st_mtime_ns == stamp and again.qids == first.qids  # read back, not re-parsed
    np.testing.assert_array_equal(again.features, first.features)
    write_split(source, [(1, 9, [7, 8])])
    os.utime(source, ns=(stamp + 10**9, stamp + 10**9))
    assert load_split(source, 2, tmp_path / "cache").qids == ("9",)
    assert load_split(source, 2, tmp_path / "cache", limit_rows=1).qids == ("9",)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one file per (source, limit_rows); no temp left


def test_datasets_keep_every_document_and_build_the_spec_comparisons(tmp_path):
    rows = [(level, 1, [float(j)]) for j, level in enumerate([0, 2, 1, 0, 2])] + [
        (0, 2, [9.0]),
        (0, 2, [8.0]),
    ]
    write_split(tmp_path / "s.txt", rows)
    split = pack(read_letor(tmp_path / "s.txt", 1), tmp_path / "s.txt")
    lists = QueryLists([("target", split), ("source", split)])
    assert [c.id for c in lists.clips.clips] == ["target:1", "target:2", "source:1", "source:2"]
    batch = collate_labels([lists[0], lists[1]])
    assert batch.text.shape == (2, 5, 1, 1) and batch.mask.sum(1).tolist() == [5, 2]
    assert batch.text[0, :, 0, 0].tolist() == [0, 1, 2, 3, 4] and batch.targets[0].tolist() == [0, 2, 1, 0, 2]
    assert batch.from_source.tolist() == [False, False]
    comparisons = QueryComparisons([("target", split)], per_query=50, seed=3, fixed=True)
    assert len(comparisons) == 50  # query 2 has one label level only
    for i in range(50):
        item = comparisons[i]
        levels = item.targets[[item.chosen[2], item.chosen[3]]]
        assert levels[0] > levels[1] and item.rejected.tolist() == [0, 1, *item.chosen[[3, 2]].tolist()]
    comparisons.set_epoch(4)
    assert (
        comparisons[7].labels.tolist() == QueryComparisons([("target", split)], 50, seed=3)[7].labels.tolist()
    )
    pairs = QueryPairs([("source", split)], pairs_per_query=6, seed=0)
    assert len(pairs) == 12 and all(len(set(pairs[i].labels.tolist())) == 2 for i in range(12))


# --- models and the command line ----------------------------------------------------------------------------------


def xit_parameters(d, ff):
    norms = 2 * (2 * d) + 2 * d + 2 * d  # ln_x, ln_y, the feed-forward's LayerNorm, the final one
    attention = 4 * (d * d + d)
    return norms + attention + (d * ff + ff) + (ff * d + d)


@pytest.mark.parametrize(("procedure", "expected"), [("pointwise", 14_173_441), ("reward", 21_267_457)])
def test_dry_run_counts_the_spec_layer_sizes(capsys, procedure, expected):
    d, ff = 768, 3072
    out_layer = (2 * d * ff + ff) + (ff * d + d)
    scorer = xit_parameters(d, ff) + out_layer + (d + 1)
    reward = xit_parameters(d, ff) + out_layer + 4 * d + xit_parameters(d, ff) + (d + 1)
    assert (scorer, reward) == (14_173_441, 21_267_457)  # the original's 14.17 M and 21.27 M
    assert main(["--procedure", procedure, "--task", "letor", "--dry_run", "--device", "cpu"]) == 0
    assert f"trainable parameters: {expected}\n" in capsys.readouterr().out


def released_models(width=46, source_width=136):
    torch.manual_seed(0)
    sizes = LabelRankingConfig(visual_feat_dim=8, feedforward_size=16, xit_heads=2, compat_xit_attention=True)
    sizes = LabelRankingConfig(**{**sizes.__dict__, "inputs": "vectors"})
    return sizes.build_alignment_model(width, source_width).eval(), sizes.build_scorer().eval()


def test_pinned_eval_interface_on_released_layouts(tmp_path, caplog):
    align, scorer = released_models()
    torch.save(align.state_dict(), tmp_path / "ALIGN.bin")  # the original's layouts: bare state dicts
    torch.save(scorer.state_dict(), tmp_path / "SCORER.bin")
    rng = np.random.default_rng(0)
    rows = [
        (int(rng.integers(3)), qid, rng.normal(size=46).round(4)) for qid in (30, 4, 30.5) for _ in range(3)
    ]
    rows = [(label, str(qid).replace(".5", "1"), x) for label, qid, x in rows]
    write_split(tmp_path / "test.txt", rows)
    argv = ["--procedure", "eval", "--task", "letor", "--alignment_model_path", str(tmp_path / "ALIGN.bin")]
    argv += [
        "--pretrained_model_path",
        str(tmp_path / "SCORER.bin"),
        "--target_test_path",
        str(tmp_path / "test.txt"),
    ]
    argv += ["--metrics_out", str(tmp_path / "M.json"), "--cases_out", str(tmp_path / "C.json")]
    argv += ["--visual_feat_dim", "8", "--feedforward_size", "16", "--xit_heads", "2", "--device", "cpu"]
    argv += ["--log_dir", str(tmp_path / "log")]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert "compat_xit_attention=True (the original's attention)" in caplog.text
    metrics, cases = (json.loads((tmp_path / n).read_text()) for n in ("M.json", "C.json"))
    keys = ["NDCG@1", "NDCG@3", "NDCG@5", "NDCG@10", "NDCG@all"]
    assert list(metrics) == keys
    assert [c["qid"] for c in cases] == ["30", "4", "301"] and all(
        list(c) == ["qid", "scores", "ndcg"] for c in cases
    )
    with torch.no_grad():  # independently: text_proj, then the scorer on [1, n, 1, d] vectors
        for n, case in enumerate(cases):
            x = torch.tensor(np.array([r[2] for r in rows[3 * n : 3 * n + 3]]), dtype=torch.float32)
            expected = scorer(torch.zeros(1, 0, 8), align.text_proj(x)[None, :, None, :])[0]
            np.testing.assert_allclose(case["scores"], expected.numpy(), rtol=1e-5, atol=1e-6)
            labels = [r[0] for r in rows[3 * n : 3 * n + 3]]
            assert case["ndcg"] == pytest.approx({k: clip_ndcg(expected.numpy(), labels)[k] for k in keys})
    assert metrics["NDCG@all"] == pytest.approx(np.mean([c["ndcg"]["NDCG@all"] for c in cases]))


def test_target_wider_than_the_alignment_model_names_file_and_line(tmp_path, capsys):
    align, scorer = released_models(width=40)
    torch.save(align.state_dict(), tmp_path / "ALIGN.bin")
    torch.save(scorer.state_dict(), tmp_path / "SCORER.bin")
    write_split(tmp_path / "test.txt", [(0, 1, [0.1] * 40), (1, 1, [0.2] * 46)])
    argv = ["--procedure", "eval", "--task", "letor", "--alignment_model_path", str(tmp_path / "ALIGN.bin")]
    argv += [
        "--pretrained_model_path",
        str(tmp_path / "SCORER.bin"),
        "--target_test_path",
        str(tmp_path / "test.txt"),
    ]
    argv += [*SMALL, "--log_dir", str(tmp_path / "log")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'test.txt'}:2: feature index 46 beyond the declared width of 40" in err
    assert err.count("\n") == 1


def stage_argv(tmp_path: Path, source_dir: Path, target_dir: Path) -> list[str]:
    """One epoch of a LETOR stage at the small sizes, its cache and logs under `tmp_path`."""
    return [*SMALL, "--source_dir", str(source_dir), "--target_dir", str(target_dir), "--epochs_num", "1",
            "--letor_cache_dir", str(tmp_path / "cache"), "--log_dir", str(tmp_path / "log")]  # fmt: skip


def test_stages_run_from_main_on_generated_folds(tmp_path):
    demo = ensure_letor_demo(tmp_path / "demo", queries=(6, 4, 3, 3), align_target_queries=3)
    common = stage_argv(tmp_path, demo.source_dir, demo.target_dir)
    common += ["--batch_size", "4", "--report_steps", "2", "--max_tags", "2", "--reward_val_triplets", "2"]

    def stage(procedure, task, name, *extra):
        out = tmp_path / f"{name}.json"
        argv = [
            "--procedure",
            procedure,
            "--task",
            task,
            "--exp_name",
            name,
            *common,
            "--metrics_out",
            str(out),
            *extra,
        ]
        assert main(argv) == 0
        return json.loads(out.read_text())

    def best(procedure, name):
        return str(tmp_path / "log" / procedure / name / "checkpoints" / "best.pt")

    stage("pointwise", "letor_align", "align", "--limit_rows", "50")
    last = tmp_path / "log" / "pointwise" / "align" / "checkpoints" / "last.pt"
    resumed = [
        "--procedure",
        "pointwise",
        "--resume",
        str(last),
        "--metrics_out",
        str(tmp_path / "resumed.json"),
    ]
    assert main([*resumed, "--device", "cpu"]) == 0  # the saved --task letor_align is the run's
    assert json.loads((tmp_path / "resumed.json").read_text()) == json.loads(
        (tmp_path / "align.json").read_text()
    )
    aligned = ["--alignment_model_path", best("pointwise", "align")]
    first = stage("pointwise", "letor", "first", *aligned)
    assert first["test"]["clips"] == 3  # the target's test queries, reported
    assert stage("reward", "letor", "rm", *aligned)["test"]["comparisons"] > 0
    for objective in ("lr2ppo", "clip"):
        after = stage(
            "ppo",
            "letor",
            objective,
            *aligned,
            "--ppo_objective",
            objective,
            "--update_timesteps",
            "2",
            "--pretrained_model_path",
            best("pointwise", "first"),
            "--reward_model_path",
            best("reward", "rm"),
        )
        assert 0 <= after["test"]["NDCG@all"] <= 1
    summary = stage("data_summary", "letor", "summary")
    assert summary["target/test"]["queries"] == 3 and summary["source/train"]["features"] == 136
    assert set(summary["target/train"]["labels"]) <= {"0", "1", "2"}


# --- real MQ2008 rows -----------------------------------------------------------------------------------------------


def test_lightgbm_lambdarank_on_real_mq2008_rows(shared_data):
    pytest.importorskip("lightgbm")
    from epoch_loops.ranking.letor import lightgbm_ndcg

    a, b = (pack(read_letor(shared_data / "letor" / f"mq2008_sample_{s}.txt", 46), s) for s in "ab")
    assert len(b) == 36 and len(b.labels) == 795  # every document of every query
    official = lightgbm_ndcg(
        a, b, seed=0, empty_ideal=0
    )  # LETOR 4.0's rule: a query without relevance counts 0
    assert 0.40 < official["NDCG@10"] < 0.60
    random_scores = np.random.default_rng(0).normal(size=len(b.labels))
    chance = np.mean(
        [clip_ndcg(random_scores[b.rows(q)], b.labels[b.rows(q)], 0)["NDCG@10"] for q in range(len(b))]
    )
    assert official["NDCG@10"] > chance + 0.1
    assert lightgbm_ndcg(a, b, seed=0)["NDCG@10"] > official["NDCG@10"]  # the original's rule: empty counts 1


def test_eval_ranking_scores_letor_predictions_against_the_svmlight_labels(tmp_path, capsys):
    write_split(tmp_path / "test.txt", [(2, 8, [0.1]), (0, 8, [0.2]), (1, 5, [0.3]), (0, 5, [0.4])])
    predictions = [
        {"id": "8", "scores": [0.1, 0.9], "targets": [2, 0]},
        {"id": 5, "scores": [3, 1], "targets": [1, 0]},
    ]
    (tmp_path / "p.json").write_text(json.dumps(predictions))
    argv = ["--procedure", "eval", "--task", "ranking", "--ranking_predictions", str(tmp_path / "p.json")]
    argv += ["--test_path", str(tmp_path / "test.txt"), "--metrics_out", str(tmp_path / "m.json")]
    assert main([*argv, "--log_dir", str(tmp_path / "log")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["NDCG@1"] == pytest.approx(0.5) and metrics["clips"] == 2  # query 8 ranked wrong, 5 right
    assert metrics["NDCG@all"] == pytest.approx((3 / np.log2(3) / 3 + 1) / 2)
    predictions[1]["targets"] = [0, 1]
    (tmp_path / "p.json").write_text(json.dumps(predictions))
    assert main([*argv, "--log_dir", str(tmp_path / "log2")]) == 2
    assert "clip 5: targets [0, 1] disagree with [1, 0]" in capsys.readouterr().err


def test_export_turns_a_released_alignment_model_into_ours_and_back(tmp_path):
    align, _ = released_models()
    torch.save(align.state_dict(), tmp_path / "ALIGN.bin")
    small = ["--visual_feat_dim", "8", "--feedforward_size", "16", "--xit_heads", "2", "--device", "cpu"]
    for source, target, layout in (("ALIGN.bin", "ours.pt", "ours"), ("ours.pt", "again.bin", "released")):
        argv = [
            "--procedure",
            "export_ranking",
            "--task",
            "letor",
            "--pretrained_model_path",
            str(tmp_path / source),
        ]
        argv += ["--export_path", str(tmp_path / target), "--export_format", layout, *small]
        assert main([*argv, "--log_dir", str(tmp_path / f"log_{layout}")]) == 0
    ours = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert ours["kind"] == "align" and ours["config"]["compat_xit_attention"] is True
    again = torch.load(tmp_path / "again.bin", weights_only=True)
    assert again.keys() == align.state_dict().keys()
    assert all(torch.equal(again[k], v) for k, v in align.state_dict().items())


@pytest.mark.slow
def test_letor_demo_part(tmp_path):
    from epoch_loops.ranking.demo import letor_demo
    from main import build_parser
    from utilities.config import config_from_argv
    from utilities.run_dir import RunDir

    argv = ["--procedure", "demo", "--device", "cpu", "--no-progress", "--demo_dir", str(tmp_path / "demo")]
    cfg = config_from_argv(build_parser(), argv)
    metrics = letor_demo(cfg, RunDir(tmp_path / "run", cfg))
    assert list(metrics) == ["letor/pointwise", "letor/ppo_lr2ppo", "letor/ppo_clip", "letor/lightgbm_target"]
    assert all(list(m) == ["NDCG@10", "NDCG@all"] for m in metrics.values())
    before = metrics["letor/pointwise"]["NDCG@all"]
    assert metrics["letor/ppo_lr2ppo"]["NDCG@all"] > before and metrics["letor/ppo_clip"]["NDCG@all"] > before
    assert metrics["letor/lightgbm_target"]["NDCG@all"] > before + 0.03  # the source-trained ranker is worse


def test_real_mq2008_rows_as_the_target_through_alignment_pointwise_and_eval(shared_data, tmp_path):
    """The real rows as the target's folds (a: train, b: vali | test by query), a generated WEB10K look-alike as
    the source: alignment, pointwise and the pinned eval run on real data and keep every document."""
    demo = ensure_letor_demo(tmp_path / "demo", queries=(6, 4, 3, 3), align_target_queries=3)
    lines = (shared_data / "letor" / "mq2008_sample_b.txt").read_text().splitlines()
    qids = list(dict.fromkeys(line.split()[1] for line in lines))
    vali = [line for line in lines if line.split()[1] in qids[:18]]
    test = [line for line in lines if line.split()[1] in qids[18:]]
    for fold in ("Fold1", "Fold2"):
        folder = tmp_path / "MQ2008" / fold
        folder.mkdir(parents=True)
        (folder / "train.txt").write_text((shared_data / "letor" / "mq2008_sample_a.txt").read_text())
        (folder / "vali.txt").write_text("\n".join(vali) + "\n")
        (folder / "test.txt").write_text("\n".join(test) + "\n")
    common = stage_argv(tmp_path, demo.source_dir, tmp_path / "MQ2008")
    common += ["--batch_size", "8", "--report_steps", "5"]
    out = {name: tmp_path / f"{name}.json" for name in ("align", "first", "M", "C")}
    assert main(["--procedure", "pointwise", "--task", "letor_align", "--exp_name", "align", *common]) == 0
    align = [
        "--alignment_model_path",
        str(tmp_path / "log" / "pointwise" / "align" / "checkpoints" / "best.pt"),
    ]
    argv = ["--procedure", "pointwise", "--task", "letor", "--exp_name", "first", *common, *align]
    assert main([*argv, "--metrics_out", str(out["first"])]) == 0
    reported = json.loads(out["first"].read_text())["test"]
    assert reported["clips"] == len(qids) - 18
    scorer = str(tmp_path / "log" / "pointwise" / "first" / "checkpoints" / "best.pt")
    argv = ["--procedure", "eval", "--task", "letor", *align, "--pretrained_model_path", scorer, *SMALL]
    argv += [
        "--target_test_path",
        str(tmp_path / "MQ2008" / "Fold1" / "test.txt"),
        "--log_dir",
        str(tmp_path / "l"),
    ]
    assert main([*argv, "--metrics_out", str(out["M"]), "--cases_out", str(out["C"])]) == 0
    cases = json.loads(out["C"].read_text())
    assert [c["qid"] for c in cases] == [q[4:] for q in qids[18:]]
    assert sum(len(c["scores"]) for c in cases) == len(test)  # every document of every query, once
    assert json.loads(out["M"].read_text())["NDCG@all"] == pytest.approx(reported["NDCG@all"])
