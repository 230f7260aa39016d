"""`main.py --procedure eval`: score a predictions file and write the metrics JSON.

`--task captioning`: a dense-captioning submission, scored with the official metrics; prints the table (×100)
and a provenance line; the metrics JSON holds fractions in [0, 1].
`--task ranking`: a label-ranking predictions file (`--ranking_predictions`), scored with NDCG@k; prints one
line per metric; with `--pretrained_model_path` it scores a checkpoint on `--test_path` instead (epoch_loops/ranking.py,
the only path that imports torch).
"""

from __future__ import annotations

from pathlib import Path

from evaluation.densevid import AVERAGE_KEY, DenseCaptioningEvaluator, Report
from evaluation.formats import load_submission
from evaluation.ranking import read_predictions, score_predictions
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
        from epoch_loops.ranking import evaluate_checkpoint

        cfg.device = resolve_device(cfg.device)
        evaluate_checkpoint(cfg, run)
        return
    if not cfg.ranking_predictions:
        raise InputError(
            "--procedure eval --task ranking needs --ranking_predictions P.json, or --pretrained_model_path CKPT "
            "with --features_h5 and --test_path"
        )
    metrics = score_predictions(read_predictions(cfg.ranking_predictions), cfg.ndcg_empty_ideal)
    print(
        f"{cfg.ranking_predictions}: {metrics['clips']} clips, empty ideal DCG counts as {cfg.ndcg_empty_ideal}"
    )
    print("  ".join(f"{name}={value:.4f}" for name, value in metrics.items() if name != "clips"))
    run.write_metrics("metrics.json", metrics, cfg.metrics_out)


def evaluate_captioning(cfg: Config, run: RunDir) -> None:
    if not cfg.submission:
        raise InputError("--procedure eval needs --submission PRED.json")
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


def format_table(report: Report) -> str:
    """One row per tIoU plus the average, values ×100 with 4 decimals."""
    names = list(report.metrics[AVERAGE_KEY])
    header = ["tIoU", *names]
    rows = [[key, *(f"{100 * row[m]:.4f}" for m in names)] for key, row in report.metrics.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        " | ".join(cell.rjust(width) for cell, width in zip(r, widths, strict=False)) for r in [header, *rows]
    ]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)
