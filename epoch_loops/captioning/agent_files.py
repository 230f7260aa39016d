"""The BMHRL checkpoint folder: build the agent and its value functions from the flags or from a folder, save one.

A folder `checkpoints/E_<epoch>/` holds, as the original's:
- `bm_hrl_agent.pt`, `bm_worker_value_function.pt`, `bm_manager_value_function.pt`: plain state dicts in the
  original key layout (no `module.` prefix; the fusion feed-forward layers the original creates but never applies
  are absent; with `--segmenter heuristic` there are no `critic.*` keys);
and, ours only:
- `vocabulary.json` (the itos list the weights belong to) and `agent_config.json` (the agent's sizes), so a
  folder is self-describing: predict and eval need neither GloVe nor size flags;
- `training_state.pt`: optimiser, scheduler, counters, metric history and RNG states for an exact `--resume`.

A released folder (only the three `.pt` files) needs its vocabulary via `--vocab_path`; its sizes come from the
flags (the paper's defaults) and its segment critic from the `critic.*` keys of `bm_hrl_agent.pt`. Our folder's
sizes come from its agent_config.json; the settings that are not sizes (`RUN_SETTINGS`) and the critic
(`--rl_critic_path`, or none with `--segmenter heuristic`) follow the flags given explicitly (`loaded_settings`).
Every file is loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from datasets.embeddings import embedding_matrix
from datasets.vocabulary import Vocabulary
from epoch_loops.training import TRAINING_FILE
from model.captioning.bmhrl import (
    RUN_SETTINGS,
    AgentConfig,
    BMHRLAgent,
    ValueFunction,
    load_original_state_dict,
    manager_value_function,
    worker_value_function,
)
from utilities.checkpoint import load_checkpoint
from utilities.errors import InputError
from utilities.files import atomic_path, read_json
from utilities.seeding import Stream, stream_seed

log = logging.getLogger(__name__)

AGENT_FILE = "bm_hrl_agent.pt"
WORKER_VALUE_FILE = "bm_worker_value_function.pt"
MANAGER_VALUE_FILE = "bm_manager_value_function.pt"
VOCABULARY_FILE = "vocabulary.json"
AGENT_CONFIG_FILE = "agent_config.json"


@dataclass
class Agents:
    """The agent, its two value functions and the vocabulary they were built for."""

    agent: BMHRLAgent
    worker_value: ValueFunction
    manager_value: ValueFunction
    vocab: Vocabulary

    def to(self, device) -> Agents:
        for module in (self.agent, self.worker_value, self.manager_value):
            module.to(device)
        return self


def build_agents(
    agent_cfg: AgentConfig, vocab: Vocabulary, word_vectors: torch.Tensor | None = None, seed: int = 0
) -> Agents:
    """Fresh modules of the given sizes; the agent's exploration/sampling generator is seeded with `seed`."""
    agent = BMHRLAgent(
        len(vocab),
        agent_cfg,
        word_vectors=word_vectors,
        itos=vocab.itos,
        pad_idx=vocab.pad_idx,
        start_idx=vocab.start_idx,
        end_idx=vocab.end_idx,
    )
    agent.rng.manual_seed(stream_seed(Stream.AGENT, seed))  # not the global RNG's stream (dropout)
    return Agents(agent, worker_value_function(agent_cfg), manager_value_function(agent_cfg), vocab)


def new_agents(cfg, vocab: Vocabulary, load_weights: bool = True) -> Agents:
    """Agents for a run from scratch: sizes from the flags, word vectors from `--word_emb_caps`, the segment
    critic from `--rl_critic_path` (with `--segmenter critic`). `load_weights=False` (the dry run) reads
    neither file."""
    agent_cfg = AgentConfig.from_config(cfg)
    vectors = None
    if load_weights:
        vectors = embedding_matrix(cfg.word_emb_caps, vocab.itos, agent_cfg.d_model_caps, cfg.seed)
    agents = build_agents(agent_cfg, vocab, vectors, cfg.seed)
    if load_weights and agent_cfg.segmenter == "critic":
        load_critic(agents.agent, Path(cfg.rl_critic_path))
    return agents


def load_critic(agent: BMHRLAgent, path: Path) -> None:
    """The segment critic's weights from a critic.cp file (`--rl_critic_path`)."""
    if not path.is_file():
        raise InputError(
            f"--rl_critic_path {path}: segment critic not found (train one with --procedure train_critic, "
            "use the BMHRL authors' released critic.cp, see README 'Where to get the real things', or pass --segmenter heuristic)"
        )
    load_original_state_dict(agent.critic, load_checkpoint(path), str(path))


def is_checkpoint_folder(folder: Path) -> bool:
    return (folder / AGENT_FILE).is_file()


def load_agents(cfg, directory: str | Path, with_value_functions: bool = True) -> Agents:
    """Our checkpoint folder or a released one (see the module docstring). Errors name the file and what does
    not fit: a missing file, wrong keys or shapes, a vocabulary of another size. The log says where each
    setting came from (`loaded_settings`) and where the segment critic's weights came from."""
    folder = Path(directory)
    if folder.is_file() and folder.name == AGENT_FILE:
        folder = folder.parent
    if not is_checkpoint_folder(folder):
        raise InputError(f"--rl_pretrained_model_dir {folder}: no {AGENT_FILE} there")
    agent_state = {k.removeprefix("module."): v for k, v in load_checkpoint(folder / AGENT_FILE).items()}
    if (folder / AGENT_CONFIG_FILE).is_file():
        saved, vocab = _our_description(cfg, folder)
    else:
        saved, vocab = None, _released_vocabulary(cfg, folder)
    agent_cfg = loaded_settings(cfg, folder, saved)
    critic_file = _critic_source(
        cfg, folder, agent_cfg, has_critic=any(k.startswith("critic.") for k in agent_state)
    )
    agents = build_agents(agent_cfg, vocab, seed=cfg.seed)
    if critic_file is not None or agent_cfg.segmenter == "heuristic":
        agent_state = {k: v for k, v in agent_state.items() if not k.startswith("critic.")}
    if critic_file is not None:
        load_critic(agents.agent, critic_file)
        agent_state.update({f"critic.{k}": v for k, v in agents.agent.critic.state_dict().items()})
    dropped = load_original_state_dict(agents.agent, agent_state, str(folder / AGENT_FILE))
    if dropped:
        log.info(
            "%s: dropped the original's %d never-applied fusion feed-forward tensors (%s, ...)",
            folder / AGENT_FILE,
            len(dropped),
            dropped[0],
        )
    if with_value_functions:
        for module, name in (
            (agents.worker_value, WORKER_VALUE_FILE),
            (agents.manager_value, MANAGER_VALUE_FILE),
        ):
            load_original_state_dict(module, load_checkpoint(folder / name), str(folder / name))
    log.info("loaded %s (%s checkpoint, |V| = %d)", folder, agent_cfg.mode, len(vocab))
    return agents


def loaded_settings(cfg, folder: Path, saved: AgentConfig | None) -> AgentConfig:
    """The settings a loaded agent runs with, one log line per source. Our folder: the sizes (and mode) from its
    agent_config.json, which an explicit size flag may not contradict; the settings in RUN_SETTINGS from the
    flags given explicitly, else from the file; an explicit `--rl_critic_path` implies `--segmenter critic`.
    A released folder (`saved` None): everything from the flags."""
    flags = AgentConfig.from_config(cfg)
    if saved is None:
        log.info(
            "%s: a released checkpoint (no %s): settings from the flags: %s",
            folder,
            AGENT_CONFIG_FILE,
            _listed(flags, [f.name for f in fields(AgentConfig)]),
        )
        return flags
    sizes = [f.name for f in fields(AgentConfig) if f.name not in RUN_SETTINGS]
    for name in sizes:
        if name in cfg.given and name != "mode" and getattr(flags, name) != getattr(saved, name):
            raise InputError(
                f"--{name} {getattr(flags, name)}: {folder} holds an agent with {name} {getattr(saved, name)} "
                f"(its sizes come from {AGENT_CONFIG_FILE}); leave --{name} out"
            )
    explicit = [name for name in RUN_SETTINGS if name in cfg.given]
    if "rl_critic_path" in cfg.given and "segmenter" not in cfg.given:
        flags, explicit = replace(flags, segmenter="critic"), [*explicit, "segmenter"]
    kept = [f.name for f in fields(AgentConfig) if f.name not in explicit]
    log.info("%s: %s", folder / AGENT_CONFIG_FILE, _listed(saved, kept))
    if explicit:
        log.info("from the command line: %s", _listed(flags, explicit))
    return replace(saved, **{name: getattr(flags, name) for name in explicit})


def _critic_source(cfg, folder: Path, agent_cfg: AgentConfig, has_critic: bool) -> Path | None:
    """The critic.cp file to load into the agent, or None: the folder's `critic.*` keys (or no critic). Logs
    where the segmenter comes from. A folder without a critic needs `--segmenter` or `--rl_critic_path`."""
    if agent_cfg.mode == "BM":
        return None
    if agent_cfg.segmenter == "heuristic":
        unused = f"; the critic.* keys of {folder / AGENT_FILE} are not used" if has_critic else ""
        log.info("segmenter: heuristic (no weights%s)", unused)
        return None
    if "rl_critic_path" in cfg.given or (not has_critic and "segmenter" in cfg.given):
        log.info("segment critic: %s (--rl_critic_path)", cfg.rl_critic_path)
        return Path(cfg.rl_critic_path)
    if not has_critic:
        raise InputError(
            f"{folder / AGENT_FILE} holds no segment critic (no critic.* keys): pass --segmenter heuristic, "
            "or a critic with --rl_critic_path FILE (the BMHRL authors' critic.cp: README 'Where to get the real things')"
        )
    log.info("segment critic: the critic.* keys of %s", folder / AGENT_FILE)
    return None


def _listed(agent_cfg: AgentConfig, names: list[str]) -> str:
    return ", ".join(f"{name}={getattr(agent_cfg, name)}" for name in names)


def _our_description(cfg, folder: Path) -> tuple[AgentConfig, Vocabulary]:
    saved = read_json(folder / AGENT_CONFIG_FILE)
    try:
        agent_cfg = AgentConfig(**saved)
    except TypeError as e:
        raise InputError(f"{folder / AGENT_CONFIG_FILE}: not an agent configuration ({e})") from None
    vocab = Vocabulary.load(folder / VOCABULARY_FILE)
    if cfg.vocab_path and Vocabulary.load(cfg.vocab_path) != vocab:
        raise InputError(
            f"--vocab_path {cfg.vocab_path} differs from the vocabulary saved with {folder} "
            f"({folder / VOCABULARY_FILE}); leave --vocab_path out to use the checkpoint's"
        )
    return agent_cfg, vocab


def _released_vocabulary(cfg, folder: Path) -> Vocabulary:
    if not cfg.vocab_path:
        raise InputError(
            f"{folder} is a released checkpoint (no {VOCABULARY_FILE}): give the vocabulary its weights were "
            "trained with via --vocab_path (one token per line or a JSON list; the first four entries are "
            "unk, pad, start, end)"
        )
    return Vocabulary.load(cfg.vocab_path)


def save_agents(folder: Path, agents: Agents, training: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically (written beside, then renamed over `folder`): an interruption
    leaves the previous folder of that name intact."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        _save(tmp / AGENT_FILE, agents.agent.state_dict())
        _save(tmp / WORKER_VALUE_FILE, agents.worker_value.state_dict())
        _save(tmp / MANAGER_VALUE_FILE, agents.manager_value.state_dict())
        _write_text(tmp / VOCABULARY_FILE, json.dumps(agents.vocab.to_list(), ensure_ascii=False) + "\n")
        _write_text(tmp / AGENT_CONFIG_FILE, json.dumps(asdict(agents.agent.cfg), indent=2) + "\n")
        if training is not None:
            _save(tmp / TRAINING_FILE, training)
    return folder


def _save(path: Path, state: dict) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
