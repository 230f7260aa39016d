"""`main.py --procedure eval`: score a predictions file and write the metrics JSON.

`--task captioning`: a dense-captioning submission, scored with the official metrics; prints the table (×100)
and a provenance line; the metrics JSON holds fractions in [0, 1]. With `--rl_pretrained_model_dir DIR` instead of
`--submission`, the checkpoint is validated 1-by-1 on val_1 and val_2 (`epoch_loops.captioning.train`; this path, and
only this one, imports torch).
`--task ranking`: a label-ranking predictions file (`--ranking_predictions`), scored with NDCG@k against the gold
clip list `--test_path` when given (its reader imports torch; a LETOR svmlight file, `.txt`, gives each qid's labels
in file order: the predictions' ids are its qids), else with the file's own targets; prints where the
targets came from and the metrics; with `--pretrained_model_path` it scores a checkpoint on `--test_path` instead
(epoch_loops/ranking/stages.py).
"""

from __future__ import annotations

from pathlib import Path

from evaluation.densevid import DenseCaptioningEvaluator, format_table
from evaluation.formats import load_submission
from evaluation.ranking import match_gold, read_predictions, score_predictions
from utilities.config import Config
from utilities.errors import InputError
from utilities.run_dir import RunDir


def evaluate(cfg: Config, run: RunDir) -> None:
    if cfg.task == "ranking":
        evaluate_ranking(cfg, run)
    else:
        evaluate_captioning(cfg, run)


def evaluate_ranking(cfg: Config, run: RunDir) -> None:
    """A predictions file (no torch), or a checkpoint that scores `--test_path` (torch imported here only)."""
    if cfg.pretrained_model_path:
        from epoch_loops.procedures import resolve_device
        from epoch_loops.ranking.stages import evaluate_checkpoint

        cfg.device = resolve_device(cfg.device)
        evaluate_checkpoint(cfg, run)
        return
    if not cfg.ranking_predictions:
        raise InputError(
            "--procedure eval --task ranking needs --ranking_predictions P.json, or --pretrained_model_path CKPT "
            "with --features_h5 and --test_path"
        )
    predictions = read_predictions(cfg.ranking_predictions)
    if cfg.test_path and Path(cfg.test_path).suffix != ".json":  # LETOR svmlight: qid → labels in file order
        from datasets.ranking.letor import read_letor

        gold = {query.qid: query.labels.tolist() for query in read_letor(cfg.test_path)}
        predictions = match_gold(predictions, gold, cfg.ranking_predictions, cfg.test_path)
        targets = f"the labels of {cfg.test_path}"
    elif cfg.test_path:
        from datasets.ranking.lrmovienet import read_clip_list

        gold = {clip.id: clip.targets for clip in read_clip_list(cfg.test_path).clips}
        predictions = match_gold(predictions, gold, cfg.ranking_predictions, cfg.test_path)
        targets = f"the gold targets of {cfg.test_path}"
    else:
        targets = "the targets in the predictions file itself (--test_path GOLD.json checks them against a gold list)"
    metrics = score_predictions(predictions, cfg.ndcg_empty_ideal)
    print(
        f"{cfg.ranking_predictions}: {metrics['clips']} clips scored against {targets}; "
        f"empty ideal DCG counts as {cfg.ndcg_empty_ideal}"
    )
    print("  ".join(f"{name}={value:.4f}" for name, value in metrics.items() if name != "clips"))
    run.write_metrics("metrics.json", metrics, cfg.metrics_out)


def evaluate_captioning(cfg: Config, run: RunDir) -> None:
    if not cfg.submission and cfg.rl_pretrained_model_dir:
        from epoch_loops.captioning.train import validate_checkpoint_procedure

        validate_checkpoint_procedure(cfg, run)
        return
    if not cfg.submission:
        raise InputError(
            "--procedure eval needs --submission PRED.json (or --rl_pretrained_model_dir DIR to validate a checkpoint)"
        )
    for what, path in [
        ("--submission", cfg.submission),
        *(("--reference_paths", p) for p in cfg.reference_paths),
    ]:
        if not Path(path).is_file():  # checked before METEOR's JVM is started
            raise InputError(f"{what} {path}: file not found")
    with DenseCaptioningEvaluator(  # starts METEOR's JVM first: it loads while the files are read
        cfg.reference_paths,
        tious=cfg.tIoUs,
        max_proposals=cfg.max_prop_per_vid,
        soda=cfg.soda,
        seed=cfg.seed,
    ) as evaluator:
        results = load_submission(cfg.submission)
        report = evaluator.evaluate(results, source=str(cfg.submission))
    print(report.provenance())
    print(format_table(report))
    run.write_metrics("metrics.json", report.metrics, cfg.metrics_out)
