"""LR²PPO checkpoints: ours (`best.pt`/`last.pt`, with the run's config) and the original's released `.bin`
files (plain state dicts), read into one `RankingWeights`; `--procedure export_ranking` converts between
the two layouts. Every file is loaded with `torch.load(weights_only=True)`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.ranking.scorer import (
    RUN_SETTINGS,
    LabelRankingConfig,
    alignment_widths,
    join_ppo_state,
    split_ppo_state,
)
from utilities.checkpoint import (
    FORMAT_VERSION,
    check_model_state,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from utilities.config import Config
from utilities.errors import InputError
from utilities.run_dir import RunDir, is_rank0

log = logging.getLogger(__name__)

KINDS = ("pointwise", "reward", "ppo", "align")  # align: LETOR's alignment model


@dataclass(frozen=True)
class RankingWeights:
    """Model weights read from a checkpoint, in our key layout (= the original's; PPO: `actor.*` + `critic.*`).
    `saved_config` is our checkpoint's config (model sizes); None for a released `.bin`."""

    kind: str  # pointwise | reward | ppo
    state: dict[str, Tensor]
    source: str
    saved_config: dict[str, Any] | None = None


def read_ranking_weights(path: str | Path) -> RankingWeights:
    """Our checkpoint (`best.pt`/`last.pt`) or a released plain state dict, loaded with weights_only.
    A released file's kind follows from its keys: `actor.*`/`critic.*` PPO, `pos_emb.weight` reward,
    `text_proj3.*` LETOR's alignment model."""
    state = load_checkpoint(path)
    if "format_version" in state and "model" in state:
        kind = state.get("kind")
        if kind not in KINDS:
            raise InputError(f"{path}: not a label-ranking checkpoint (kind {kind!r})")
        return RankingWeights(kind, state["model"], str(path), state.get("config"))
    stray = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if stray:
        raise InputError(f"{path}: neither our checkpoint nor a plain state dict (non-tensor {stray[:3]})")
    if any(k.startswith(("actor.", "critic.")) for k in state):
        kind = "ppo"
    elif "pos_emb.weight" in state:
        kind = "reward"
    elif any(k.startswith("text_proj3.") for k in state):
        kind = "align"
    else:
        kind = "pointwise"
    return RankingWeights(kind, state, str(path))


def model_sizes(cfg: Config, weights: RankingWeights | None = None) -> LabelRankingConfig:
    """The sizes and attention mode to build a model for `weights` at, said in the log.

    - no weights: the flags;
    - our checkpoint: its saved config; a size flag or `--compat_xit_attention` given explicitly with another
      value is an error naming both (the checkpoint was trained so); an explicit `--xit_dropout` applies;
    - a released file (the original's layout, no config): sizes from the flags and the original's attention
      (`compat_xit_attention=True`, what every released file was trained with), unless
      `--[no-]compat_xit_attention` is given explicitly.
    """
    flags = LabelRankingConfig.from_config(cfg)
    if weights is None:
        return flags
    if weights.saved_config is None:
        if "compat_xit_attention" not in cfg.given:
            flags = replace(flags, compat_xit_attention=True)
        log.info(
            "%s: the original's layout (no config of ours): sizes from the flags, compat_xit_attention=%s (%s)",
            weights.source,
            flags.compat_xit_attention,
            "--compat_xit_attention" if "compat_xit_attention" in cfg.given else "the original's attention",
        )
        return flags
    saved = LabelRankingConfig.from_config(Config(**weights.saved_config))
    for name in (f.name for f in fields(LabelRankingConfig) if f.name not in RUN_SETTINGS):
        if name in cfg.given and getattr(flags, name) != getattr(saved, name):
            raise InputError(
                f"--{name} {getattr(flags, name)}: {weights.source} was trained with {name} "
                f"{getattr(saved, name)} (our checkpoints carry their sizes and attention mode); leave --{name} out"
            )
    explicit = {name: getattr(flags, name) for name in RUN_SETTINGS if name in cfg.given}
    log.info("%s: sizes and attention mode from its config: %s", weights.source, _listed(saved))
    return replace(saved, **explicit)


def starting_sizes(cfg: Config) -> tuple[LabelRankingConfig, RankingWeights | None]:
    """The settings a stage builds its model at: those of `--pretrained_model_path` when it starts from one
    (`model_sizes`), else the flags. The run's config records them, so its data readers and checkpoints follow."""
    weights = read_ranking_weights(cfg.pretrained_model_path) if cfg.pretrained_model_path else None
    sizes = model_sizes(cfg, weights)
    adopt_sizes(cfg, sizes)
    return sizes, weights


def adopt_sizes(cfg: Config, sizes: LabelRankingConfig) -> None:
    """Record in the run's config the settings its models were built at."""
    for f in fields(sizes):
        setattr(cfg, f.name, getattr(sizes, f.name))


def _listed(sizes: LabelRankingConfig) -> str:
    return ", ".join(f"{f.name}={getattr(sizes, f.name)}" for f in fields(sizes))


def actor_state(weights: RankingWeights) -> dict[str, Tensor]:
    """Scorer weights: a pointwise checkpoint, or the actor of a PPO one."""
    if weights.kind == "pointwise":
        return weights.state
    if weights.kind == "ppo":
        return split_ppo_state(weights.state, weights.source)[0]
    raise InputError(
        f"{weights.source}: a {'reward-model' if weights.kind == 'reward' else 'alignment-model'} checkpoint; a "
        "scorer (pointwise or PPO) is needed here"
    )


def reward_state(weights: RankingWeights) -> dict[str, Tensor]:
    if weights.kind != "reward":
        raise InputError(
            f"{weights.source}: a {weights.kind} checkpoint; a reward-model checkpoint is needed"
        )
    return weights.state


def load_weights(model: nn.Module, state: dict[str, Tensor], source: str) -> nn.Module:
    load_model_state(model, state, source)
    return model


def export_ranking(cfg: Config, run: RunDir) -> None:
    """`--procedure export_ranking --pretrained_model_path IN --export_path OUT [--export_format released|ours]`:
    released = the original's plain state dict (pointwise / reward / PPO `actor.*`+`critic.*` keys); ours = a
    checkpoint of ours with the model sizes (from IN, or from the flags for a released `.bin`)."""
    if not cfg.pretrained_model_path or not cfg.export_path:
        raise InputError("--procedure export_ranking needs --pretrained_model_path IN and --export_path OUT")
    weights = read_ranking_weights(cfg.pretrained_model_path)
    sizes = model_sizes(cfg, weights)
    with torch.device("meta"):  # checks the layout against the sizes without allocating the model
        models = {"pointwise": sizes.build_scorer, "reward": sizes.build_reward_model}
        if weights.kind == "align":
            widths = alignment_widths(weights.state, weights.source)
            models["align"] = lambda: sizes.build_alignment_model(**widths)
        if weights.kind == "ppo":
            actor, critic = split_ppo_state(weights.state, weights.source)
            check_model_state(sizes.build_scorer(), actor, f"{weights.source} (actor)")
            check_model_state(sizes.build_reward_model(), critic, f"{weights.source} (critic)")
            state = join_ppo_state(actor, critic)
        else:
            check_model_state(models[weights.kind](), weights.state, weights.source)
            state = weights.state
    if cfg.export_format == "released":
        content = dict(state)
        if not sizes.compat_xit_attention:
            log.warning(
                "%s: the released layout carries no settings and is read with the original's attention; this "
                "model was trained without it: load the file with --no-compat_xit_attention",
                cfg.export_path,
            )
    else:
        saved = weights.saved_config or {**cfg.to_dict(), **sizes.__dict__}
        content = weights_checkpoint(weights.kind, state, Config(**saved))
    if is_rank0():
        save_checkpoint(cfg.export_path, content)
    print(f"{weights.kind} checkpoint {weights.source} → {cfg.export_path} ({cfg.export_format} layout)")


def weights_checkpoint(kind: str, state: dict[str, Tensor], cfg: Config, **extra: Any) -> dict[str, Any]:
    """Our weights-only checkpoint: the state dict in the original's keys, the kind and the run's config."""
    return {"format_version": FORMAT_VERSION, "kind": kind, "model": state, "config": cfg.to_dict(), **extra}
