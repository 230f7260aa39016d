"""`--amp` and `--compile` in the one training machinery: a warm-start step and an RL step under bf16 autocast on
the CPU have the losses of fp32 within 2 %, weights and gradients stay fp32, fp16 steps through its loss scaler
(whose scale is saved and restored with the training state), and the compiled forward trains the same agent."""

from __future__ import annotations

import shutil

import pytest
import torch

from datasets.captioning.activitynet import CaptionBatch
from datasets.vocabulary import Vocabulary
from epoch_loops.captioning import rl
from epoch_loops.captioning import train as captioning
from epoch_loops.training import checkpoint_state, precision, resume
from main import build_parser
from tests.test_captioning import D_AUD, D_VID, tiny_argv
from tests.test_rl import WordCountReward
from utilities.checkpoint import save_checkpoint
from utilities.config import Config

VOCAB = ["<unk>", "<blank>", "<s>", "</s>", "a", "man", "and", "dog", "ball"]


def trainer_for(tmp_path, *flags: str) -> captioning.Trainer:
    paths = {"train_meta_path": "unused.csv"}
    argv = tiny_argv(paths, tmp_path, "amp", "--dout_p", "0", *flags)
    cfg = Config(**vars(build_parser().parse_args(argv)))
    cfg.device = "cpu"
    torch.manual_seed(0)
    agents = captioning.new_agents(cfg, Vocabulary(VOCAB))
    agents.agent.train()
    agents.agent.set_phase("warm_start")
    return captioning.Trainer.create(cfg, agents, None, None)


def batch() -> CaptionBatch:
    g = torch.Generator().manual_seed(0)
    captions = torch.tensor([[2, 5, 6, 4, 7, 3], [2, 4, 8, 3, 1, 1], [2, 7, 3, 1, 1, 1]])
    return CaptionBatch(
        video=torch.randn(3, 5, D_VID, generator=g),
        video_mask=torch.ones(3, 5, dtype=torch.bool),
        audio=torch.rand(3, 7, D_AUD, generator=g),
        audio_mask=torch.ones(3, 7, dtype=torch.bool),
        captions=captions,
        caption_mask=captions != 1,
        caption_lengths=(captions != 1).sum(1),
        video_ids=["a", "b", "c"],
        starts=[0.0] * 3,
        ends=[1.0] * 3,
        durations=[2.0] * 3,
        raw_captions=["x"] * 3,
        indices=[0, 1, 2],
    )


def warm_start_step(trainer: captioning.Trainer) -> float:
    with trainer.autocast():
        loss, _ = captioning.warm_start_loss(trainer.forward, batch(), trainer.cfg.smoothing)
    assert loss.dtype == torch.float32  # the loss reduces in fp32 whatever the precision
    trainer.optimiser_step(loss, 0, 0, None)
    return float(loss)


def test_the_default_precision_is_none_on_the_cpu():
    assert precision(None, torch.device("cpu")) == "none"
    assert precision("bf16", torch.device("cpu")) == "bf16"


def test_bf16_warm_start_step_has_the_fp32_loss_within_2_percent(tmp_path):
    fp32, bf16 = trainer_for(tmp_path), trainer_for(tmp_path, "--amp", "bf16")
    assert bf16.amp == "bf16" and fp32.amp == "none"
    for _ in range(3):
        assert warm_start_step(bf16) == pytest.approx(warm_start_step(fp32), rel=0.02)
    assert all(p.dtype == torch.float32 for p in bf16.agents.agent.parameters())  # checkpoints stay fp32
    pairs = zip(fp32.agents.agent.parameters(), bf16.agents.agent.parameters(), strict=True)
    moved = [(a - b).abs().max() for a, b in pairs]
    assert max(moved) < 1e-2  # the same optimisation up to bf16 rounding


def test_fp16_steps_through_its_loss_scaler(tmp_path):
    trainer = trainer_for(tmp_path, "--amp", "fp16")
    assert trainer.optimisation.scaler is not None
    before = trainer.agents.agent.worker.projection.weight.clone()
    warm_start_step(trainer)
    assert trainer.optimisation.step == 1
    assert not torch.equal(before, trainer.agents.agent.worker.projection.weight)


@pytest.mark.slow
def test_compile_runs_a_warm_start_step_with_the_eager_loss(tmp_path):
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler (none on this machine)")
    eager, compiled = trainer_for(tmp_path), trainer_for(tmp_path, "--compile")
    assert compiled.forward is not compiled.agents.agent
    assert warm_start_step(compiled) == pytest.approx(warm_start_step(eager), rel=1e-4)


class OneBatch(list):
    """A stand-in for the training loader: one batch per epoch."""

    class sampler:
        @staticmethod
        def set_epoch(epoch: int) -> None:
            pass


def rl_epoch_losses(trainer: captioning.Trainer) -> dict[str, float]:
    """One biased_kl worker epoch of one batch, the reward a toy word count (no Java)."""
    trainer.rewards = rl.Rewards(WordCountReward("man"), {"x": "a man and a dog"}, trainer.agents.vocab)
    step = batch()
    step.stand_in = False
    trainer.train_batches = OneBatch([step])
    return rl.rl_epoch(trainer, 0, "worker")


def test_bf16_rl_step_has_the_fp32_loss_within_2_percent(tmp_path):
    flags = ("--rl_objective", "biased_kl", "--rl_stabilize")
    fp32, bf16 = trainer_for(tmp_path, *flags), trainer_for(tmp_path, *flags, "--amp", "bf16")
    a, b = rl_epoch_losses(fp32), rl_epoch_losses(bf16)
    assert a["reward"] == b["reward"]  # the same sampled tokens
    for key in ("loss_worker", "loss_worker_value"):
        assert b[key] != a[key]  # the forward ran in bf16 ...
        assert b[key] == pytest.approx(a[key], rel=0.02), key  # ... and the losses reduced in fp32


def test_a_resumed_fp16_run_continues_with_the_saved_loss_scale(tmp_path):
    """The scaler's state goes into the training state and comes back on resume (a fresh scaler starts at 65536
    and would re-learn the scale through skipped steps)."""
    trainer = trainer_for(tmp_path, "--amp", "fp16")
    warm_start_step(trainer)
    trainer.optimisation.scaler.update(new_scale=1024.0)
    state = checkpoint_state(trainer.optimisation, trainer.cfg, None, epoch=1, best_metric=None)
    save_checkpoint(tmp_path / "state.pt", state)

    resumed = trainer_for(tmp_path, "--amp", "fp16")
    assert resumed.optimisation.scaler.get_scale() == 65536.0
    resume(resumed.optimisation, tmp_path / "state.pt", None)
    assert resumed.optimisation.scaler.get_scale() == 1024.0
    assert resumed.optimisation.scaler.state_dict() == trainer.optimisation.scaler.state_dict()
    resume(trainer_for(tmp_path).optimisation, tmp_path / "state.pt", None)  # resumed without fp16: ignored
