"""RL for BMHRL (issue 10): the epoch plan, the credit-assignment arithmetic against hand-computed values, rewards of
token prefixes equal to METEOR 1.5 computed directly, frozen modules bit-identical after an RL epoch of the other
(both directions, both objectives), SCST's gradient sign and learning on a toy reward, the BiasedKL target, and the
failure modes (a METEOR process killed mid-epoch, a NaN reward)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.captioning.activitynet import read_captions_csv
from datasets.loader import caption_loaders
from datasets.vocabulary import Vocabulary, vocabulary_from_config
from epoch_loops.captioning import rl
from epoch_loops.captioning import train as captioning
from epoch_loops.captioning.agent_files import AGENT_FILE, TRAINING_FILE
from evaluation.meteor import Meteor
from evaluation.rewards import MeteorReward, SentenceReward, hypothesis_text
from main import build_parser, main
from model.captioning.losses import BIASED_KL_SCALE, biased_kl_loss, label_smoothing_loss
from tests.conftest import requires_java
from tests.test_captioning import tiny_argv, write_tiny_dataset
from utilities.config import Config
from utilities.errors import InputError
from utilities.seeding import seed_everything


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_rl") / "data")


@pytest.fixture(scope="module")
def meteor():
    with Meteor() as m:
        yield m


def config(tiny_data, tmp_path, *extra: str) -> Config:
    cfg = Config(**vars(build_parser().parse_args(tiny_argv(tiny_data, tmp_path, "t", *extra))))
    cfg.device = "cpu"
    return cfg


def make_trainer(cfg: Config, meteor) -> captioning.Trainer:
    seed_everything(cfg.seed)
    captions = [s.caption for s in read_captions_csv(cfg.train_meta_path).segments]
    agents = captioning.new_agents(cfg, vocabulary_from_config(cfg, captions))
    datasets = captioning.caption_datasets(cfg, agents.vocab, agents.agent.cfg.mode, with_train=True)
    train_batches, _ = caption_loaders(cfg, datasets["train"], {})
    return captioning.Trainer.create(cfg, agents, train_batches, meteor)


# ---- the epoch plan ---------------------------------------------------------------------------------------------


def test_epoch_plan_alternates_only_after_exactly_w_warm_start_epochs(tiny_data, tmp_path):
    cfg = config(tiny_data, tmp_path, "--rl_warmstart_epochs", "2")
    assert [captioning.epoch_phase(cfg, e) for e in range(6)] == [
        "warm_start", "warm_start", "worker", "manager", "worker", "manager",
    ]  # fmt: skip
    cfg = config(tiny_data, tmp_path, "--rl_warmstart_epochs", "1", "--no-rl_train_worker")
    assert [captioning.epoch_phase(cfg, e) for e in range(4)] == [
        "warm_start",
        "manager",
        "worker",
        "manager",
    ]
    cfg = config(tiny_data, tmp_path, "--rl_warmstart_epochs", "0", "--mode", "BM", "--no-rl_train_worker")
    assert [captioning.epoch_phase(cfg, e) for e in range(3)] == ["worker"] * 3  # no manager to train


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--scst_baseline", "mean", "--rl_samples", "1"], "needs --rl_samples 2"),
        (["--rl_stabilize"], "--scst_baseline value"),
    ],
)
def test_bad_rl_settings_are_refused_before_any_work(tiny_data, tmp_path, capsys, flags, message):
    argv = tiny_argv(tiny_data, tmp_path, "bad", "--rl_warmstart_epochs", "1", "--epoch_num", "2", *flags)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("main.py: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "train_rl_cap").exists()


# ---- credit assignment, by hand ---------------------------------------------------------------------------------


def test_sub_goal_gains_spread_and_discounted_returns_by_hand():
    curve = torch.tensor([[0.1, 0.3, 0.3, 0.6, 0.5, 0.0]])
    ends = torch.tensor([[False, True, False, True, True, False]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    gains = rl.gains_at_ends(curve, ends)
    torch.testing.assert_close(gains, torch.tensor([[0, 0.3, 0, 0.3, -0.1, 0]]))
    assert float(gains.sum()) == pytest.approx(0.5)  # the gains add up to the final prefix reward
    spread = rl.spread_over_segments(gains, ends, mask)
    torch.testing.assert_close(spread, torch.tensor([[0.3, 0.3, 0.3, 0.3, -0.1, 0]]))
    returns = rl.discounted_returns(gains, ends, 0.5)
    torch.testing.assert_close(
        returns, torch.tensor([[0, 0.3 + 0.5 * 0.3 + 0.25 * -0.1, 0, 0.3 + 0.5 * -0.1, -0.1, 0]])
    )
    held = rl.held(torch.tensor([[0.2, 0.4, 0.0]]), torch.tensor([1]), 5)
    torch.testing.assert_close(held, torch.tensor([[0.2, 0.4, 0.4, 0.4, 0.4]]))
    tokens = torch.tensor([[5, 3, 1, 1], [5, 6, 7, 8]])
    assert rl.generated_mask(tokens, 3).tolist() == [[True, True, False, False], [True] * 4]
    assert rl.last_positions(rl.generated_mask(tokens, 3)).tolist() == [1, 3]


def test_biased_kl_target_moves_mass_to_the_sampled_token_and_detaching_stops_its_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, requires_grad=True)
    log_probs = logits.log_softmax(-1)
    targets = torch.tensor([[4, 5, 3], [6, 3, 1]])
    sampled = torch.tensor([[5, 5, 4], [4, 2, 1]])
    zero = torch.zeros(2, 3)
    plain = label_smoothing_loss(log_probs.detach(), targets, 1, 0.7, normalizer=5.0)
    assert float(biased_kl_loss(log_probs.detach(), targets, sampled, zero, 1, 0.7, 5.0)) == pytest.approx(
        float(plain) / BIASED_KL_SCALE
    )
    # an independent loop: q(y) = 0.3 (1 − a), q(ŷ) += 0.3 a, 0.7 / 5 on the other non-pad tokens
    amplitude = torch.tensor([[1.0, 0.4, 0.0], [0.25, 1.0, 0.0]])
    expected = 0.0
    for b in range(2):
        for t in range(3):
            if targets[b, t] == 1:
                continue
            q = [0.0 if v == 1 else 0.7 / 5 for v in range(7)]
            q[targets[b, t]] = 0.3 * (1 - float(amplitude[b, t]))
            q[sampled[b, t]] += 0.3 * float(amplitude[b, t])
            assert sum(q) == pytest.approx(1.0)
            expected += sum(qv * (np.log(qv) - float(log_probs[b, t, v])) for v, qv in enumerate(q) if qv > 0)
    ours = biased_kl_loss(log_probs.detach(), targets, sampled, amplitude, 1, 0.7, 5.0)
    assert float(ours) == pytest.approx(expected / 5.0 / BIASED_KL_SCALE, rel=1e-5)
    amplitude = torch.full((2, 3), 0.5, requires_grad=True)
    biased_kl_loss(log_probs, targets, sampled, amplitude, 1, 0.7, 5.0).backward()
    assert amplitude.grad.abs().sum() > 0  # --compat_biased_kl_grad: gradient through the target
    assert torch.isfinite(amplitude.grad).all()


# ---- rewards ----------------------------------------------------------------------------------------------------


@requires_java
def test_prefix_rewards_of_token_ids_equal_meteor_computed_directly(meteor):
    vocab = Vocabulary(["<unk>", "<blank>", "<s>", "</s>", "a", "man", ",", "runs", "on", "track", "."])
    rewards = rl.Rewards(MeteorReward(meteor), {}, vocab)
    ids = [vocab.stoi[w] for w in ["a", "man", ",", "<unk>", "runs", "on", "a", "track", ".", "</s>"]]
    tokens = torch.tensor([ids, [*ids[:3], 1, 1, 1, 1, 1, 1, 1]])
    mask = torch.tensor([[True] * 10, [True] * 3 + [False] * 7])
    reference = "a man is running down a track"
    curve = rewards.prefix_rewards(tokens, mask, [reference, reference])
    words = [vocab.itos[i] for i in ids if i not in (0, 1, 2, 3)]
    kept = [0, 1, 2, 2, 3, 4, 5, 6, 7, 7]  # words so far at each position (specials left out)
    expected = [meteor.sentence_scores([(hypothesis_text(words[: k + 1]), [reference])])[0] for k in kept]
    assert curve[0].tolist() == pytest.approx(expected, abs=1e-7)
    assert curve[1, :3].tolist() == pytest.approx(expected[:3], abs=1e-7)
    assert curve[1, 3:].abs().sum() == 0  # padding scores nothing
    assert curve[0, 9] == curve[0, 8] > curve[0, 0] > 0  # the end token adds no word


class WordCountReward(SentenceReward):
    """A toy reward: the share of the hypothesis' words that are `word` (no Java)."""

    name = "toy"

    def __init__(self, word: str):
        super().__init__()
        self.word = word

    def _score(self, pairs):
        return [h.split().count(self.word) / max(len(h.split()), 1) for h, _ in pairs]


def toy_rewards(trainer, word: str) -> rl.Rewards:
    captions = {s.caption for s in trainer.train_batches.dataset.segments}
    return rl.Rewards(WordCountReward(word), {c: c for c in captions}, trainer.agents.vocab)


# ---- frozen modules ---------------------------------------------------------------------------------------------


@requires_java
@pytest.mark.parametrize("objective", ["scst", "biased_kl"])
@pytest.mark.parametrize("module", ["worker", "manager"])
def test_frozen_module_is_bit_identical_after_an_rl_epoch_of_the_other(
    tiny_data, tmp_path, meteor, objective, module
):
    cfg = config(tiny_data, tmp_path, "--rl_objective", objective, "--rl_samples", "2", "--rl_cap_lr", "1e-2")
    trainer = make_trainer(cfg, meteor)
    captioning.warm_start_epoch(trainer, 0)  # Adam moments for every parameter: stale ones must not move them
    agent = trainer.agents.agent
    frozen_name = "manager" if module == "worker" else "worker"
    frozen = {id(p) for m in agent.module_groups()[frozen_name] for p in m.parameters()}
    names = {id(p): n for n, p in agent.named_parameters()}

    def snapshot(which: set[int], value_function) -> dict[str, torch.Tensor]:
        params = {names[i]: p for p in agent.parameters() if (i := id(p)) in which}
        params.update({f"vf.{n}": p for n, p in value_function.named_parameters()})
        return {n: p.detach().clone() for n, p in params.items()}

    other_value = trainer.agents.manager_value if module == "worker" else trainer.agents.worker_value
    trained_value = trainer.agents.worker_value if module == "worker" else trainer.agents.manager_value
    before = snapshot(frozen, other_value)
    trained_ids = {id(p) for m in agent.module_groups()[module] for p in m.parameters()}
    trained_before = snapshot(trained_ids, trained_value)
    adam_before = {
        id(p): {k: v.clone() for k, v in trainer.optimizer.state[p].items()}
        for p in agent.parameters()
        if id(p) in frozen
    }
    stats = rl.rl_epoch(trainer, 1, module)
    assert stats[f"loss_{module}"] != 0 and np.isfinite(stats["reward"])
    after = snapshot(frozen, other_value)
    assert all(torch.equal(before[n], after[n]) for n in before), "the frozen module moved"
    for p in agent.parameters():  # its Adam moments untouched too
        if id(p) in frozen:
            assert all(torch.equal(adam_before[id(p)][k], v) for k, v in trainer.optimizer.state[p].items())
    trained_after = snapshot(trained_ids, trained_value)
    changed = [n for n in trained_before if not torch.equal(trained_before[n], trained_after[n])]
    assert any(not n.startswith("vf.") for n in changed) and any(n.startswith("vf.") for n in changed)


@requires_java
def test_warm_start_is_exactly_w_epochs_and_the_first_rl_epoch_trains_the_named_module(tiny_data, tmp_path):
    runs = {}
    for exp, epochs, extra in (("w", "1", []), ("m", "2", ["--no-rl_train_worker"]), ("k", "2", [])):
        argv = tiny_argv(
            tiny_data, tmp_path, exp, "--rl_warmstart_epochs", "1", "--epoch_num", epochs, *extra
        )
        assert main([*argv, "--one_by_one_starts_at", "5", "--rl_samples", "2", "--rl_cap_lr", "1e-2"]) == 0
        folder = tmp_path / "train_rl_cap" / exp / "checkpoints" / "last"
        runs[exp] = torch.load(folder / AGENT_FILE, weights_only=True)
        phases = [r["phase"] for r in json.loads((folder.parents[1] / "metrics.json").read_text())["history"]]
        assert (
            phases
            == {"w": ["warm_start"], "m": ["warm_start", "manager"], "k": ["warm_start", "worker"]}[exp]
        )

    def side(state, prefixes):
        return {k: v for k, v in state.items() if k.startswith(prefixes)}

    manager = ("manager.", "bm_manager_fus.")
    worker = ("worker.", "bm_worker_fus.", "bm_enc.")
    for exp, trained, frozen in (("m", manager, worker), ("k", worker, manager)):
        assert all(torch.equal(v, runs["w"][k]) for k, v in side(runs[exp], frozen).items())
        assert not all(torch.equal(v, runs["w"][k]) for k, v in side(runs[exp], trained).items())


# ---- SCST: the gradient's sign and learning on a toy reward ------------------------------------------------------


@pytest.mark.parametrize("mode", ["BM", "BMHRL"])
def test_scst_gradient_sign_better_samples_gain_probability(tiny_data, tmp_path, monkeypatch, mode):
    """The policy gradient on each sampled token's log-probability is −advantage / #tokens: negative (descent
    raises the probability) for a sample that beats the mean of the others, positive for a worse one (BMHRL:
    checked on the captions of one sub-goal). BM: one advantage per caption, R_n − mean of the others."""
    cfg = config(tiny_data, tmp_path, "--mode", mode, "--rl_samples", "4", "--scst_baseline", "mean")
    trainer = make_trainer(cfg, None)
    rewards = toy_rewards(trainer, "man")
    kept = {}
    real_sample = rl.sample

    def keep(*args, **kwargs):
        kept["rollout"] = rollout = real_sample(*args, **kwargs)
        rollout.log_probs.retain_grad()
        return rollout

    monkeypatch.setattr(rl, "sample", keep)
    trainer.agents.agent.set_phase("worker")
    trainer.agents.agent.train()
    batch = next(iter(trainer.train_batches))
    result = rl.scst_step(trainer, batch, "worker", rewards)
    result.policy_loss.backward()
    rollout = kept["rollout"]
    grad, mask = rollout.log_probs.grad, rollout.mask
    curve = rewards.prefix_rewards(rollout.tokens, mask, [c for c in batch.raw_captions for _ in range(4)])
    final = curve.gather(1, rl.last_positions(mask)[:, None]).squeeze(1).view(-1, 4)
    advantage = (final - (final.sum(1, keepdim=True) - final) / 3).view(-1)
    assert (advantage > 0).any() and (advantage < 0).any()
    if mode == "BM":
        expected = -advantage[:, None] * mask / mask.sum()
        torch.testing.assert_close(grad, expected.float())
    # A caption of one sub-goal has one advantage; one of several has an advantage per sub-goal (their signs
    # may differ from the caption's), so the caption-level sign is checked where it is the only one.
    single = [
        n for n in range(len(advantage)) if rollout.segment_ends is None or rollout.segment_ends[n].sum() == 1
    ]
    assert (advantage[single] > 0).any() and (advantage[single] < 0).any()
    for n in single:
        if advantage[n] > 0:
            assert float(grad[n][mask[n]].sum()) < 0
        elif advantage[n] < 0:
            assert float(grad[n][mask[n]].sum()) > 0


def test_scst_learns_a_toy_reward(tiny_data, tmp_path):
    """Reward = the share of 'woman' among the words: a few worker SCST steps (greedy baseline) raise it."""
    cfg = config(tiny_data, tmp_path, "--rl_samples", "4", "--rl_cap_lr", "3e-3", "--dout_p", "0.0")
    cfg.rl_warmstart_epochs = (
        0  # no warm start here: the agent trains at --rl_cap_lr, not the warm-start rate
    )
    trainer = make_trainer(cfg, None)
    trainer.rewards = toy_rewards(trainer, "woman")
    rewards = [rl.rl_epoch(trainer, e, "worker")["reward"] for e in range(6)]
    assert rewards[-1] > rewards[0] + 0.1, rewards


# ---- determinism ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["scst", "biased_kl"])
def test_loader_workers_do_not_change_the_trained_weights(tiny_data, tmp_path, objective):
    """The same seed trains bit-identical weights with --num_workers 0 and 2: a warm-start epoch, then an RL
    epoch (dropout and sampling draw the same numbers; the loader draws its worker seeds from its own
    generator, not from torch's global RNG)."""

    def train(workers: str) -> list[dict[str, torch.Tensor]]:
        cfg = config(
            tiny_data, tmp_path, "--num_workers", workers, "--rl_objective", objective, "--rl_samples", "2"
        )
        trainer = make_trainer(cfg, None)
        trainer.rewards = toy_rewards(trainer, "woman")
        modules = (trainer.agents.agent, trainer.agents.worker_value, trainer.agents.manager_value)

        def weights() -> dict[str, torch.Tensor]:
            return {f"{n}.{k}": v.clone() for n, m in enumerate(modules) for k, v in m.state_dict().items()}

        captioning.warm_start_epoch(trainer, 0)
        warm = weights()
        rl.rl_epoch(trainer, 1, "worker")
        return [warm, weights()]

    without, with_workers = train("0"), train("2")
    for phase, a, b in zip(("warm start", "RL epoch"), without, with_workers, strict=True):
        differing = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differing, f"{phase}: {len(differing)} tensors differ, e.g. {differing[:3]}"


# ---- failure modes ----------------------------------------------------------------------------------------------


@requires_java
def test_meteor_killed_mid_epoch_is_restarted_and_the_epoch_goes_on(tiny_data, tmp_path, monkeypatch, caplog):
    cfg = config(tiny_data, tmp_path, "--rl_samples", "2")
    with Meteor(timeout=30) as meteor:
        trainer = make_trainer(cfg, meteor)
        rl.rewards_of(trainer)
        real_write = Meteor._write
        kills = []

        def kill_once(proc, payload):
            if not kills:
                kills.append(proc.pid)
                proc.kill()
                proc.wait()
            real_write(proc, payload)

        monkeypatch.setattr(Meteor, "_write", staticmethod(kill_once))
        stats = rl.rl_epoch(trainer, 1, "worker")
        assert kills and np.isfinite(stats["reward"])
        assert "restarting it" in caplog.text
        assert meteor._proc is not None and meteor._proc.pid != kills[0]


@requires_java
def test_nan_reward_stops_naming_the_step_with_the_last_checkpoint_intact(
    tiny_data, tmp_path, capsys, monkeypatch
):
    calls = []
    real_step = rl.STEPS["scst"]

    def nan_from_step_4(trainer, batch, module, rewards):
        calls.append(1)
        if len(calls) == 4:  # epoch 2 (3 batches an epoch), batch 0
            monkeypatch.setattr(rewards.reward, "_score", lambda pairs: [float("nan")] * len(pairs))
            rewards.reward._cache.clear()
        return real_step(trainer, batch, module, rewards)

    monkeypatch.setitem(rl.STEPS, "scst", nan_from_step_4)
    argv = tiny_argv(tiny_data, tmp_path, "nan", "--rl_warmstart_epochs", "1", "--epoch_num", "3")
    assert main([*argv, "--one_by_one_starts_at", "5", "--rl_samples", "2"]) == 2
    err = capsys.readouterr().err
    last = tmp_path / "train_rl_cap" / "nan" / "checkpoints" / "last"
    assert (
        err.count("\n") == 1 and "non-finite reward" in err and "at optimiser step 7 (epoch 2, batch 0" in err
    )
    assert f"last good checkpoint is {last}" in err
    state = torch.load(last / TRAINING_FILE, weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 6
    assert all(torch.isfinite(v).all() for v in torch.load(last / AGENT_FILE, weights_only=True).values())


def test_rl_flags_are_real_booleans_and_documented():
    parser = build_parser()

    def parse(*flags: str):
        return parser.parse_args(["--procedure", "train_rl_cap", *flags])

    assert parse("--no-rl_train_worker").rl_train_worker is False and parse().rl_train_worker is True
    assert parse("--rl_stabilize").rl_stabilize is True and parse().compat_biased_kl_grad is False
    defaults = parse()
    assert (defaults.rl_objective, defaults.rl_reward, defaults.scst_baseline) == ("scst", "meteor", "greedy")
    assert (defaults.rl_gamma_worker, defaults.rl_gamma_manager) == (0.7, 0.8)
    with pytest.raises(InputError):
        rl.check_settings(Config(**{**vars(defaults), "rl_objective": "ppo"}))


def test_the_docs_document_the_rl_formulas():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "bmhrl.md").read_text()
    for flag in ("--rl_objective", "--scst_baseline", "--compat_biased_kl_grad", "--rl_gamma_manager"):
        assert flag in readme
