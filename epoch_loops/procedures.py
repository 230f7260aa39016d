"""The procedures `main.py --procedure NAME` dispatches to, and the set-up every run shares.

Each entry names `module:function`; the module is imported only when that procedure runs, so `--help` stays
fast. Procedures that never use torch say so, and then torch (about a second to import) is not loaded at all:
`eval` is run every epoch and in scripts. A procedure is `fn(cfg: Config, run: RunDir) -> None`: it builds
what it needs from `cfg`, writes its outputs into `run`, and honours `cfg.dry_run` where it builds a model.
The training procedures (`trains`) accept `--resume`, which restores the saved run's settings first
(epoch_loops/training.py). Ctrl-C ends a run with one line: where its last checkpoint is, or that none was written.

Under torchrun (`torchrun --nproc_per_node=N main.py ...`) the procedures marked `distributed` join the job's
process group for the run (utilities/distributed.py); rank 0 picks the run directory's name and alone writes to
it and to the console (other ranks log warnings only); the others refuse to start rather than repeat the same
work N times.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from utilities.config import Config
from utilities.errors import InputError, Interrupted
from utilities.log import setup_logging
from utilities.run_dir import RunDir, free_timestamp_name, is_rank0, launched_world_size
from utilities.seeding import seed_everything


@dataclass(frozen=True)
class Procedure:
    """One entry of the registry. `groups` names the flag groups (main.py) the procedure reads besides the common
    ones, so `--procedure NAME --help` shows exactly those; `help_groups` adds what the shared set-up reads."""

    target: str  # "module:function"
    summary: str  # one line for `main.py --help`
    groups: tuple[str, ...] = ()
    uses_torch: bool = True
    trains: bool = False  # writes resumable checkpoints; accepts --resume
    distributed: bool = False  # runs under torchrun, sharing the work over the processes

    def function(self) -> Callable[[Config, RunDir], None]:
        """The procedure itself, its module imported now (not at `--help`)."""
        module_name, function_name = self.target.split(":")
        return getattr(importlib.import_module(module_name), function_name)


# Flag groups of the captioning data pipeline, of its agent, and of LR²PPO's models and stages.
CAPTION_DATA = ("captions", "features", "feature_files", "vocabulary", "loader")
AGENT = (*CAPTION_DATA, "agent", "critic")
RANKING = (
    "ranking_model",
    "ranking_checkpoint",
    "ranking_batches",
    "loader",
    "ranking_evaluation",
    "metrics",
)
STAGE = (*RANKING, "clipping", "ranking_training", "precision")
LETOR_STAGE = ("LETOR", *STAGE)

# fmt: off
PROCEDURES: dict[str, Procedure] = {
    "demo": Procedure(
        "epoch_loops.demo:demo", "both systems end to end on the built-in demo data, with baselines",
        ("demo", *AGENT, "decoding", "epochs", "clipping", "early_stopping", "captioner_training", "precision", "RL",
         "proposals", "proposal_training", "evaluation", "ranking_evaluation", "metrics"),
    ),
    "eval": Procedure(
        "epoch_loops.evaluate:evaluate",
        "score predictions (captions, proposals or rankings), or validate a checkpoint",
        ("evaluation", "metrics", "proposals", *AGENT, "decoding", *RANKING, "ranking_data"),
        uses_torch=False,
    ),
    "data_summary": Procedure(
        "epoch_loops.data:data_summary", "check a caption dataset and its features, print its statistics",
        ("captions", "features", "feature_files", "vocabulary", "metrics"),
    ),
    "pack_features": Procedure(
        "epoch_loops.data:pack_features", "pack a folder of .npy features into one HDF5 file",
        ("packing", "output", "features"),
    ),
    "train_critic": Procedure(
        "epoch_loops.captioning.critic:train_critic", "train BMHRL's segment critic (the sub-goal boundaries)",
        ("captions", "vocabulary", "loader", "epochs", "clipping", "critic", "critic_training", "metrics"),
        trains=True, distributed=True,
    ),
    "train_rl_cap": Procedure(
        "epoch_loops.captioning.train:train_rl_cap", "train the BMHRL captioner: supervised warm start, then RL",
        (*AGENT, "decoding", "epochs", "clipping", "early_stopping", "captioner_training", "precision", "RL",
         "evaluation", "metrics"),
        trains=True, distributed=True,
    ),
    "train_prop": Procedure(
        "epoch_loops.captioning.proposals:train_prop", "train the event proposal generator on a captioner's encoder",
        (*AGENT, "epochs", "clipping", "early_stopping", "proposals", "proposal_training", "evaluation", "metrics"),
        trains=True, distributed=True,
    ),
    "predict": Procedure(
        "epoch_loops.captioning.predict:predict", "caption one video (given segments or its own proposals)",
        ("features", "feature_files", "vocabulary", "agent", "critic", "decoding", "predict", "proposals",
         "evaluation"),
    ),
    "pointwise": Procedure(
        "epoch_loops.ranking.stages:pointwise", "LR2PPO stage 1: the pointwise label scorer",
        (*STAGE, "ranking_data"), trains=True, distributed=True,
    ),
    "reward": Procedure(
        "epoch_loops.ranking.stages:reward", "LR2PPO stage 2: the reward model",
        (*STAGE, "ranking_data"), trains=True, distributed=True,
    ),
    "ppo": Procedure(
        "epoch_loops.ranking.ppo:ppo", "LR2PPO stage 3: PPO from the stage-1 scorer and stage-2 reward model",
        (*STAGE, "ranking_data", "PPO"), trains=True, distributed=True,
    ),
    "export_ranking": Procedure(
        "epoch_loops.ranking.checkpoints:export_ranking",
        "convert a ranking checkpoint to or from the original's released .bin",
        ("export", "ranking_checkpoint", "ranking_model", "task"),  # --task letor: a LETOR model (vector inputs)
    ),
    "letor_baselines": Procedure(
        "epoch_loops.ranking.letor:baselines", "LR2PPO's LETOR transfer: the baselines on the aligned target data",
        ("LETOR", "alignment", "ranking_model", "ranking_evaluation", "metrics", "task"),
    ),
    "plot": Procedure(
        "epoch_loops.plot:plot", "draw the learning curves of run folders into a PNG", ("plot", "output"),
        uses_torch=False,
    ),
}

# `--task` selects another implementation of some procedures: LR²PPO's LETOR transfer experiment.
TASK_PROCEDURES: dict[tuple[str, str], Procedure] = {
    ("pointwise", "letor_align"): Procedure(
        "epoch_loops.ranking.letor:align", "LETOR: the alignment model", LETOR_STAGE, trains=True, distributed=True
    ),
    ("pointwise", "letor"): Procedure(
        "epoch_loops.ranking.letor:pointwise", "LETOR: stage 1", (*LETOR_STAGE, "alignment"), trains=True, distributed=True
    ),
    ("reward", "letor"): Procedure(
        "epoch_loops.ranking.letor:reward", "LETOR: stage 2", (*LETOR_STAGE, "alignment"), trains=True, distributed=True
    ),
    ("ppo", "letor"): Procedure(
        "epoch_loops.ranking.letor:ppo", "LETOR: stage 3", (*LETOR_STAGE, "alignment", "PPO"), trains=True, distributed=True
    ),
    ("eval", "letor"): Procedure(
        "epoch_loops.ranking.letor:evaluate", "LETOR: a checkpoint on the target test rows",
        ("alignment", "LETOR_test", *RANKING),
    ),
    ("data_summary", "letor"): Procedure(
        "epoch_loops.ranking.letor:data_summary", "LETOR: the folds' statistics", ("LETOR", "metrics")
    ),
}
# fmt: on

# What the shared set-up (`run_procedure`) reads: shown for every procedure.
COMMON_GROUPS = ("run",)


def help_groups(name: str, task: str | None = None) -> tuple[str, ...]:
    """The flag groups `--procedure name [--task task]` reads: the common ones, `task` where --task selects a
    variant, `torchrun` where it runs distributed, `watching` where it trains, then its own."""
    spec = TASK_PROCEDURES.get((name, task), PROCEDURES[name])
    groups = list(COMMON_GROUPS)
    groups += ["task"] if has_variants(name) else []
    groups += ["torchrun"] if spec.distributed else []
    groups += ["watching"] if spec.trains else []
    return tuple(dict.fromkeys([*groups, *spec.groups]))


def has_variants(name: str) -> bool:
    return any(procedure == name for procedure, _ in TASK_PROCEDURES)


log = logging.getLogger(__name__)


def resolve_device(name: str) -> str:
    """'auto' → cuda if available, else cpu; a device torch does not know, or cuda without CUDA, is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device ('auto', 'cpu', 'cuda', 'cuda:0', ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"--device {name} requested but CUDA is not available (give --device cpu or --device auto)"
        )
    return name


def procedure_of(cfg: Config) -> Procedure:
    """The registry entry a run uses: its --task variant where the procedure has some (only then is --task read)."""
    if not has_variants(cfg.procedure):
        return PROCEDURES[cfg.procedure]
    return TASK_PROCEDURES.get((cfg.procedure, getattr(cfg, "task", None)), PROCEDURES[cfg.procedure])


def run_procedure(cfg: Config) -> int:
    """Decide the run directory (config.json records the settings as given, e.g. `--device auto`), resolve the
    device, seed, then run the procedure; the directory appears with the run's first write."""
    spec = procedure_of(cfg)
    if launched_world_size() > 1 and not spec.distributed:
        raise InputError(
            f"--procedure {cfg.procedure} runs in one process (torchrun is supported for: "
            f"{', '.join(n for n, p in PROCEDURES.items() if p.distributed)}); start it without torchrun"
        )
    setup_logging(progress=cfg.progress and is_rank0(), level=logging.INFO if is_rank0() else logging.WARNING)
    if cfg.resume:
        if not spec.trains:
            raise InputError(
                f"--resume: --procedure {cfg.procedure} does not train; there is nothing to resume"
            )
        from epoch_loops.training import restore_settings

        restore_settings(cfg)
        spec = procedure_of(cfg)  # with the run's --task
    with ExitStack() as stack:
        device = resolve_device(cfg.device) if spec.uses_torch else cfg.device
        if spec.distributed:
            from utilities import distributed

            device = stack.enter_context(distributed.process_group(device, cfg.dist_timeout))
            if cfg.exp_name is None and not cfg.resume:  # one name for every rank's RunDir
                cfg.exp_name = distributed.from_rank0(free_timestamp_name(Path(cfg.log_dir) / cfg.procedure))
        run = stack.enter_context(RunDir.open(cfg))  # records the settings as given (`--device auto`)
        cfg.device = device
        seed_everything(cfg.seed, with_torch=spec.uses_torch)
        try:
            spec.function()(cfg, run)
        except KeyboardInterrupt:
            raise Interrupted(interrupted(cfg, run)) from None
    return 0


def interrupted(cfg: Config, run: RunDir) -> str:
    """What Ctrl-C leaves behind: the checkpoint to resume from, or that there is none (and what blocks a rerun)."""
    last = run.last_checkpoint()
    if last is not None:
        return (
            f"interrupted; the last checkpoint is {last}: continue with "
            f"python main.py --procedure {cfg.procedure} --resume {last}"
        )
    message = "interrupted before the first checkpoint: nothing to resume"
    if run.path.exists():
        message += f"; delete {run.path} (rm -r {run.path}) to run again as --exp_name {cfg.exp_name}"
    return message
