"""`main.py --procedure eval`: score a predictions file and write the metrics JSON.

`--task captioning`: a dense-captioning submission, scored with the official metrics; prints the table (×100)
and a provenance line; the metrics JSON holds fractions in [0, 1]. With `--rl_pretrained_model_dir DIR` instead of
`--submission`, the checkpoint is validated 1-by-1 on val_1 and val_2 (`epoch_loops.captioning.train`; this path, and
only this one, imports torch).
With `--proposals P.json` as well, the checkpoint captions those proposals instead and they are scored at every
tIoU against both references, with SODA_c (epoch_loops/captioning/proposal_eval.py).
`--task proposals`: detection precision / recall / F1 of a proposal file (`--proposals`) or of a proposal
generator's proposals for the val_1 videos (`--prop_generator_model_path`).
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
    elif cfg.task == "proposals":
        evaluate_proposals(cfg, run)
    else:
        evaluate_captioning(cfg, run)


def with_torch(cfg: Config) -> None:
    """The paths of eval that run a model: eval is registered torch-free, so device and seeds are set here."""
    from epoch_loops.procedures import resolve_device
    from utilities.seeding import seed_everything

    cfg.device = resolve_device(cfg.device)
    seed_everything(cfg.seed)


def evaluate_proposals(cfg: Config, run: RunDir) -> None:
    """Detection precision / recall / F1 of a proposal file (no torch), or of a proposal generator's proposals
    for the val_1 videos (epoch_loops/captioning/proposal_eval.py)."""
    check_references(cfg)
    if cfg.proposals:
        results, source = load_submission(cfg.proposals), str(cfg.proposals)
    elif cfg.prop_generator_model_path:
        from epoch_loops.captioning.proposal_eval import generate_proposals

        with_torch(cfg)
        results, source = generate_proposals(cfg, run), str(cfg.prop_generator_model_path)
    else:
        raise InputError(
            "--procedure eval --task proposals needs --proposals P.json or --prop_generator_model_path M.pt"
        )
    with DenseCaptioningEvaluator(
        cfg.reference_paths,
        tious=cfg.tIoUs,
        max_proposals=cfg.max_prop_per_vid,
        seed=cfg.seed,
        detection_only=True,
    ) as evaluator:
        metrics = evaluator.detection(results, source)
    print(
        f"{source}: proposals against {', '.join(cfg.reference_paths)} (at most {cfg.max_prop_per_vid} per video)"
    )
    print(f"{'tIoU':>22} {'Precision':>10} {'Recall':>10} {'F1':>10}")
    for tiou, row in metrics.items():
        print(f"{tiou:>22} " + " ".join(f"{100 * row[k]:>10.2f}" for k in ("Precision", "Recall", "F1")))
    run.write_metrics("metrics.json", metrics, cfg.metrics_out)


def check_references(cfg: Config) -> None:
    for path in cfg.reference_paths:
        if not Path(path).is_file():
            raise InputError(f"--reference_paths {path}: file not found")


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
    if not cfg.submission and cfg.rl_pretrained_model_dir and cfg.proposals:
        from epoch_loops.captioning.proposal_eval import evaluate_on_proposals

        check_references(cfg)
        with_torch(cfg)
        evaluate_on_proposals(cfg, run)
        return
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
