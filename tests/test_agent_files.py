"""Loading a BMHRL checkpoint folder (`--rl_pretrained_model_dir`): sizes from the folder, the settings that are
not sizes from the flags given explicitly, the segment critic from the folder, `--rl_critic_path` or nowhere
(heuristic), and a log line per source. Tiny folders built in place: no data, no Java."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from datasets.vocabulary import Vocabulary
from epoch_loops.captioning.agent_files import (
    AGENT_CONFIG_FILE,
    VOCABULARY_FILE,
    build_agents,
    load_agents,
    save_agents,
)
from main import build_parser
from model.captioning.bmhrl import HeuristicSegmenter, SegmentCritic
from tests.test_captioning import PREDICT_SIZES, RELEASED_SIZES, WORDS
from utilities.config import Config, config_from_argv
from utilities.errors import InputError

VOCAB = Vocabulary(["<unk>", "<blank>", "<s>", "</s>", *WORDS])


def folder_of(path: Path, segmenter: str = "critic", released: bool = False) -> Path:
    torch.manual_seed(0)
    save_agents(path, build_agents(replace(PREDICT_SIZES, segmenter=segmenter), VOCAB))
    if released:
        (path / AGENT_CONFIG_FILE).unlink()
        (path / VOCABULARY_FILE).rename(path.parent / "vocab.json")
    return path


def critic_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(SegmentCritic(PREDICT_SIZES.d_model_caps).state_dict(), path)
    return path


def flags(folder: Path, *extra: str) -> Config:
    argv = ["--procedure", "predict", "--rl_pretrained_model_dir", str(folder), *extra]
    return config_from_argv(build_parser(), argv)


def test_explicit_settings_that_are_not_sizes_apply_and_the_log_names_each_source(tmp_path, caplog):
    folder = folder_of(tmp_path / "ours")
    extra = ["--dout_p", "0.3", "--rl_critic_score_threshhold", "0.5", "--unfreeze_word_emb"]
    with caplog.at_level(logging.INFO):
        agent = load_agents(flags(folder, *extra), folder).agent
    assert (agent.cfg.dout_p, agent.cfg.rl_critic_score_threshhold, agent.cfg.unfreeze_word_emb) == (
        0.3,
        0.5,
        True,
    )
    assert agent.critic.threshold == 0.5 and agent.emb_C.embedder.weight.requires_grad
    assert (agent.cfg.d_model, agent.cfg.d_model_caps) == (16, 12)  # sizes from the folder, not the defaults
    assert "agent_config.json: mode=BMHRL, d_vid=1024" in caplog.text
    assert (
        "from the command line: dout_p=0.3, rl_critic_score_threshhold=0.5, unfreeze_word_emb=True"
        in caplog.text
    )
    assert "segment critic: the critic.* keys of" in caplog.text

    with pytest.raises(
        InputError, match=r"--d_model 32: .*ours holds an agent with d_model 16 .*leave --d_model out"
    ):
        load_agents(flags(folder, "--d_model", "32"), folder)


def test_a_critic_given_explicitly_replaces_the_folders_or_switches_a_heuristic_folder_to_it(
    tmp_path, caplog
):
    new = critic_file(tmp_path / "new.cp", seed=5)
    expected = torch.load(new, weights_only=True)
    for segmenter in ("critic", "heuristic"):
        folder = folder_of(tmp_path / segmenter, segmenter)
        with caplog.at_level(logging.INFO):
            agent = load_agents(flags(folder, "--rl_critic_path", str(new)), folder).agent
        assert agent.cfg.segmenter == "critic"
        assert all(torch.equal(v, expected[k]) for k, v in agent.critic.state_dict().items())
        assert f"segment critic: {new} (--rl_critic_path)" in caplog.text

    folder = folder_of(tmp_path / "to_heuristic")
    agent = load_agents(flags(folder, "--segmenter", "heuristic"), folder).agent
    assert isinstance(agent.critic, HeuristicSegmenter)


def test_a_released_folder_without_a_critic_needs_segmenter_heuristic_or_a_critic_path(tmp_path):
    folder = folder_of(tmp_path / "released", "heuristic", released=True)
    released = [*RELEASED_SIZES, "--vocab_path", str(tmp_path / "vocab.json")]
    with pytest.raises(InputError, match=r"no critic\.\* keys.*--segmenter heuristic.*--rl_critic_path"):
        load_agents(flags(folder, *released), folder)
    assert isinstance(
        load_agents(flags(folder, *released, "--segmenter", "heuristic"), folder).agent.critic,
        HeuristicSegmenter,
    )
    new = critic_file(tmp_path / "new.cp", seed=5)
    agent = load_agents(flags(folder, *released, "--rl_critic_path", str(new)), folder).agent
    assert torch.equal(agent.critic.lin.weight, torch.load(new, weights_only=True)["lin.weight"])
