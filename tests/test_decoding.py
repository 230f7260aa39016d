"""Decoding: the cache gives the full-prefix recomputation's tokens exactly, rows stop at the end token, beam
search of width 1 is greedy, rollouts are seeded and consistent with the teacher-forced pass."""

from __future__ import annotations

import math

import pytest
import torch

from model.captioning.bmhrl import AgentConfig, BMHRLAgent
from model.captioning.decoding import beam_search, greedy_decode, sample
from tests.test_bmhrl_model import END, PAD, SMALL, V, loaded_agent, make_inputs, original_state_dict

ITOS = [" UNK ", "<blank>", "<s>", "</s>", ",", ".", "and", "then", *[f"w{i}" for i in range(V - 8)]]


def agent_for(kind: str, goal_timing: str = "original") -> BMHRLAgent:
    """Random weights whose captions vary with the position and the features (not one repeated word); 'critic'
    has the test's critic weights, whose labels vary too."""
    mode = {"critic": "BMHRL", "heuristic": "BMHRL", "BM": "BM", "AHRL": "AHRL"}[kind]
    segmenter = "critic" if kind == "critic" else "heuristic"
    torch.manual_seed(0)
    cfg = AgentConfig(**{**SMALL.__dict__, "mode": mode, "segmenter": segmenter, "goal_timing": goal_timing})
    agent = BMHRLAgent(V, cfg, word_vectors=0.2 * torch.randn(V, SMALL.d_model_caps), itos=ITOS).eval()
    if kind == "critic":
        critic = {
            k.removeprefix("critic."): v for k, v in original_state_dict().items() if k.startswith("critic.")
        }
        agent.critic.load_state_dict(critic)
        with torch.no_grad():  # centre the logits on the threshold: about half the tokens end a segment
            raw = agent.critic.logits(agent.emb_C(torch.randint(0, V, (8, 12))))[0]
            agent.critic.lin.bias += math.log(0.25 / 0.75) - raw.median()
    output = agent.worker.projection if agent.hierarchical else agent.projection
    with torch.no_grad():
        output.weight.normal_(0, 3.0)
        output.bias.zero_()
    return agent


@pytest.mark.parametrize("goal_timing", ["original", "aligned"])
@pytest.mark.parametrize("kind", ["critic", "heuristic", "BM", "AHRL"])
@pytest.mark.parametrize("B", [1, 4])
def test_cached_greedy_equals_full_prefix_greedy(kind, B, goal_timing):
    agent = agent_for(kind, goal_timing)
    video, video_mask, audio, audio_mask, _ = make_inputs(B=B)
    cached = greedy_decode(agent, video, video_mask, audio, audio_mask, max_len=12)
    full = greedy_decode(agent, video, video_mask, audio, audio_mask, max_len=12, use_cache=False)
    assert torch.equal(cached, full)
    assert cached.shape[0] == B and cached.shape[1] <= 12
    assert len(set(cached.flatten().tolist())) > 2, "weights must give varied tokens"


def test_finished_rows_stop_and_decoding_ends_when_all_finish():
    agent = loaded_agent()
    video, video_mask, audio, audio_mask, _ = make_inputs(B=4)
    tokens = greedy_decode(agent, video, video_mask, audio, audio_mask, max_len=30)
    with torch.no_grad():
        agent.worker.projection.bias[END] += 3.0  # make the end token likely at some steps
    tokens = greedy_decode(agent, video, video_mask, audio, audio_mask, max_len=30)
    ended = tokens == END
    assert ended.any(dim=1).any(), "some row must finish"
    for row in tokens:
        if (row == END).any():
            after = row[int((row == END).nonzero()[0]) + 1 :]
            assert (after == PAD).all()
    if ended.any(dim=1).all():
        assert tokens.shape[1] == int((ended.int().argmax(1)).max()) + 1
    with torch.no_grad():
        agent.worker.projection.bias[END] += 100.0
    assert torch.equal(greedy_decode(agent, video, video_mask, audio, audio_mask), torch.full((4, 1), END))


def test_max_len_bounds_the_generated_tokens():
    agent = agent_for("heuristic")
    video, video_mask, audio, audio_mask, _ = make_inputs(B=2)
    assert greedy_decode(agent, video, video_mask, audio, audio_mask, max_len=3).shape[1] <= 3


@pytest.mark.parametrize("kind", ["critic", "BM"])
def test_beam_of_one_is_greedy_and_wider_beams_decode(kind):
    agent = agent_for(kind)
    video, video_mask, audio, audio_mask, _ = make_inputs(B=3)
    greedy = greedy_decode(agent, video, video_mask, audio, audio_mask, max_len=10)
    assert torch.equal(
        beam_search(agent, video, video_mask, audio, audio_mask, beam_size=1, max_len=10), greedy
    )


def naive_beam_search(agent, features, beam_size, max_len, length_penalty):
    """One row, every hypothesis re-scored on its whole prefix: (tokens, total log-prob, finished)."""
    beams = [([], 0.0, False)]
    for _ in range(max_len):
        candidates = []
        for tokens, score, finished in beams:
            if finished:
                candidates.append((tokens, score, True))
                continue
            prefix = torch.tensor([[agent.start_idx, *tokens]])
            with torch.no_grad():
                log_probs = agent(*features, prefix).log_probs[0, -1]
            for token in range(agent.vocab_size):
                candidates.append(([*tokens, token], score + log_probs[token].item(), token == END))
        beams = sorted(candidates, key=lambda c: -c[1])[:beam_size]
        if all(finished for _, _, finished in beams):
            break
    best = max(beams, key=lambda c: c[1] / len(c[0]) ** length_penalty)
    return best[0]


@pytest.mark.parametrize("goal_timing", ["original", "aligned"])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_equals_a_naive_beam_search(length_penalty, goal_timing):
    agent = agent_for("critic", goal_timing)
    video, video_mask, audio, audio_mask, _ = make_inputs(B=2)
    beams = beam_search(
        agent, video, video_mask, audio, audio_mask, 3, max_len=6, length_penalty=length_penalty
    )
    for row in range(2):
        features = [t[row : row + 1] for t in (video, video_mask, audio, audio_mask)]
        expected = naive_beam_search(agent, features, 3, 6, length_penalty)
        assert beams[row, : len(expected)].tolist() == expected
        assert (beams[row, len(expected) :] == PAD).all()


@pytest.mark.parametrize("goal_timing", ["original", "aligned"])
def test_rollouts_are_seeded_and_match_the_teacher_forced_pass(goal_timing):
    agent = loaded_agent(goal_timing=goal_timing)
    video, video_mask, audio, audio_mask, _ = make_inputs(B=2)
    agent.rng.manual_seed(7)
    first = sample(agent, video, video_mask, audio, audio_mask, max_len=8, num_samples=3, explore=False)
    agent.rng.manual_seed(7)
    second = sample(agent, video, video_mask, audio, audio_mask, max_len=8, num_samples=3, explore=False)
    assert torch.equal(first.tokens, second.tokens) and first.tokens.shape[0] == 6
    assert len({tuple(r) for r in first.tokens.tolist()}) > 1
    # the log-probs of the sampled tokens equal those of a teacher-forced pass over the sampled caption
    prefix = torch.cat((torch.full((6, 1), agent.start_idx), first.tokens[:, :-1]), 1)
    prefix = prefix.masked_fill(~torch.cat((torch.ones(6, 1, dtype=torch.bool), first.mask[:, :-1]), 1), PAD)
    rep = [t.repeat_interleave(3, 0) for t in (video, video_mask, audio, audio_mask)]
    out = agent(*rep, prefix)
    expected = out.log_probs.gather(2, first.tokens[..., None])[..., 0] * first.mask
    torch.testing.assert_close(first.log_probs.detach(), expected.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.goal_starts, out.goal_starts & first.mask)
    # a sub-goal's last token is the one before the next goal start, or the caption's last token
    for row in range(6):
        n = int(first.mask[row].sum())
        ends = first.segment_ends[row, :n].tolist()
        starts = first.goal_starts[row, :n].tolist()
        assert ends == [*starts[1:], True]
    assert (first.tokens[~first.mask] == PAD).all() and (first.log_probs[~first.mask] == 0).all()


def test_rollout_log_probs_carry_gradient_and_exploration_is_seeded():
    agent = loaded_agent()
    video, video_mask, audio, audio_mask, _ = make_inputs(B=1)
    agent.rng.manual_seed(1)
    rollout = sample(agent, video, video_mask, audio, audio_mask, max_len=6, num_samples=2, explore=True)
    (rollout.log_probs.sum() + rollout.goal_log_probs.sum()).backward()
    assert agent.manager.linear.weight.grad.abs().sum() > 0
    assert agent.worker.projection.weight.grad.abs().sum() > 0
    assert (rollout.goal_log_probs[rollout.goal_starts] != 0).all()
    agent.rng.manual_seed(1)
    again = sample(agent, video, video_mask, audio, audio_mask, max_len=6, num_samples=2, explore=True)
    assert torch.equal(rollout.tokens, again.tokens)
    torch.testing.assert_close(rollout.goal_log_probs, again.goal_log_probs)


def test_aligned_timing_takes_the_critics_goal_one_position_earlier():
    """The same critic labels: a goal taken at position t+1 under 'original' is taken at t under 'aligned'."""
    video, video_mask, audio, audio_mask, captions = make_inputs(B=3)
    with torch.no_grad():
        original = agent_for("critic")(video, video_mask, audio, audio_mask, captions).goal_starts
        aligned = agent_for("critic", "aligned")(video, video_mask, audio, audio_mask, captions).goal_starts
    assert original[:, 1:].any() and original[:, 0].all() and aligned[:, 0].all()
    assert torch.equal(aligned[:, :-1] | original[:, :1], original[:, 1:] | aligned[:, :1])
    assert torch.equal(aligned[:, 1:-1], original[:, 2:])
