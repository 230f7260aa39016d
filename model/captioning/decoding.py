"""Caption decoding for the agent: greedy (cached, or the original's full-prefix recomputation), beam search, and
sampled rollouts for RL. Every function takes the features as the agent does (video, video_mask, audio,
audio_mask; masks (B, S) bool or None) and returns generated token ids (B, T), T ≤ max_len, without the start
token; a row that has emitted the end token is padded with `pad_idx` after it (the caller strips specials).

Call `agent.eval()` first for validation: the functions do not change the module's mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.captioning.bmhrl import BMHRLAgent
from utilities.seeding import RowStreams, uniform


def _first_ids(agent: BMHRLAgent, batch_size: int, device) -> torch.Tensor:
    return torch.full((batch_size,), agent.start_idx, dtype=torch.long, device=device)


def _device_and_rows(video, audio) -> tuple[torch.device, int]:
    features = video if video is not None else audio
    return features.device, features.shape[0]


@torch.no_grad()
def greedy_decode(
    agent: BMHRLAgent, video, video_mask, audio, audio_mask, max_len: int = 30, use_cache: bool = True
) -> torch.Tensor:
    """Arg-max decoding of at most `max_len` tokens; stops when every row has emitted the end token.
    `use_cache=False` re-runs the whole agent (encoder included) on the whole prefix at every step, as the
    original does: same tokens, kept for tests and the benchmark."""
    device, B = _device_and_rows(video, audio)
    ids = _first_ids(agent, B, device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    generated = []
    if use_cache:
        state = agent.start_decoding(agent.encode(video, video_mask, audio, audio_mask))
    for _ in range(max_len):
        if use_cache:
            log_probs = agent.step(ids, state).log_probs
        else:
            prefix = torch.stack([_first_ids(agent, B, device), *generated], dim=1)
            log_probs = agent(video, video_mask, audio, audio_mask, prefix).log_probs[:, -1]
        ids = log_probs.argmax(-1).masked_fill(finished, agent.pad_idx)
        generated.append(ids)
        finished |= ids == agent.end_idx
        if finished.all():
            break
    return torch.stack(generated, dim=1)


@torch.no_grad()
def beam_search(
    agent: BMHRLAgent,
    video,
    video_mask,
    audio,
    audio_mask,
    beam_size: int = 5,
    max_len: int = 30,
    length_penalty: float = 1.0,
) -> torch.Tensor:
    """Beam search with the cache. A finished beam keeps its score and continues with padding. The best beam of
    each row maximises sum(log p) / n^length_penalty, n = its number of generated tokens (the end token
    included): 0 ranks by total log-probability (favours short captions), 1 by mean log-probability per token.
    `beam_size=1` is greedy decoding."""
    device, B = _device_and_rows(video, audio)
    K, V = beam_size, agent.vocab_size
    state = agent.start_decoding(agent.encode(video, video_mask, audio, audio_mask).repeat_interleave(K))
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0  # the K beams start identical: expand only the first
    ids = _first_ids(agent, B * K, device)
    tokens = torch.empty(B * K, 0, dtype=torch.long, device=device)
    finished = torch.zeros(B * K, dtype=torch.bool, device=device)
    lengths = torch.zeros(B * K, device=device)
    only_pad = torch.full((V,), float("-inf"), device=device)
    only_pad[agent.pad_idx] = 0
    rows = torch.arange(B, device=device)[:, None] * K
    for _ in range(max_len):
        log_probs = agent.step(ids, state).log_probs
        log_probs = torch.where(finished[:, None], only_pad, log_probs)
        scores, flat = (scores.reshape(-1, 1) + log_probs).view(B, K * V).topk(K, dim=1)
        source = (rows + flat // V).view(-1)
        ids = (flat % V).view(-1)
        state.reorder(source)
        lengths = lengths[source] + (~finished[source])
        finished = finished[source] | (ids == agent.end_idx)
        tokens = torch.cat((tokens[source], ids[:, None]), dim=1)
        if finished.all():
            break
    best = (scores / lengths.view(B, K).clamp_min(1) ** length_penalty).argmax(1)
    return tokens.view(B, K, -1)[torch.arange(B, device=device), best]


@dataclass
class Rollout:
    """Sampled captions, (N, T) each with N = B · num_samples (the samples of a segment are consecutive rows).
    Position t is generated token t (the decoder input there is token t−1, or the start token)."""

    tokens: torch.Tensor  # long; padded with pad_idx after the end token
    log_probs: torch.Tensor  # log p(token); differentiable when sampled with grad enabled; 0 on padding
    mask: torch.Tensor  # bool: a generated token (the end token included), not padding
    entropy: torch.Tensor  # entropy of the token distribution (no grad), 0 on padding
    goal_starts: torch.Tensor | None  # bool: this token was generated under a newly taken goal
    segment_ends: torch.Tensor | None  # bool: the last token generated under its goal
    goal_log_probs: torch.Tensor | None  # log-density of the goal taken at goal starts (exploring), else 0
    worker_feat: torch.Tensor  # (N, T, d_caps) the worker's features at each decoder input (for values)
    manager_feat: torch.Tensor | None  # (N, T, d_caps)
    goals: torch.Tensor | None  # (N, T, goal_d) the goal held at each position


@torch.no_grad()
def draw(log_probs: torch.Tensor, rng: torch.Generator | RowStreams) -> torch.Tensor:
    """One token per distribution of `log_probs` (..., V) by inverse CDF, the uniforms from `rng` (a CPU
    generator or one per row, so the same seed gives the same tokens on any device). The CDF is summed in fp32
    whatever the autocast precision of `log_probs`."""
    cumulative = log_probs.float().exp().cumsum(-1)
    u = uniform((*cumulative.shape[:-1], 1), rng).to(cumulative)
    picked = torch.searchsorted(cumulative, u * cumulative[..., -1:]).squeeze(-1)
    return picked.clamp_max(log_probs.shape[-1] - 1)


def sample(
    agent: BMHRLAgent,
    video,
    video_mask,
    audio,
    audio_mask,
    max_len: int = 30,
    num_samples: int = 1,
    explore: bool = True,
) -> Rollout:
    """Sample captions token by token (multinomial at temperature 1, random numbers from `agent.rng`, so the
    same seed gives the same rollouts on any device). The segmenter and the goals see the *sampled* prefix; with
    `explore` the manager's goals carry exploration noise. Runs with grad enabled unless the caller disables it,
    so `log_probs` and `goal_log_probs` can carry policy gradients."""
    device, B = _device_and_rows(video, audio)
    N = B * num_samples
    state = agent.start_decoding(
        agent.encode(video, video_mask, audio, audio_mask).repeat_interleave(num_samples), explore=explore
    )
    ids = _first_ids(agent, N, device)
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    columns: dict[str, list[torch.Tensor]] = {
        k: []
        for k in ("tokens", "log_probs", "mask", "entropy", "starts", "goal_lp", "worker", "manager", "goal")
    }
    for _ in range(max_len):
        out = agent.step(ids, state)
        alive = ~finished
        ids = draw(out.log_probs, agent.rng).masked_fill(finished, agent.pad_idx)
        with torch.no_grad():
            entropy = -(out.log_probs.exp() * out.log_probs).sum(-1) * alive
        columns["tokens"].append(ids)
        columns["log_probs"].append(out.log_probs.gather(1, ids[:, None]).squeeze(1) * alive)
        columns["mask"].append(alive)
        columns["entropy"].append(entropy)
        columns["worker"].append(out.worker_feat)
        if out.goal_start is not None:
            columns["starts"].append(out.goal_start & alive)
            goal_lp = out.goal_log_prob if out.goal_log_prob is not None else torch.zeros(N, device=device)
            columns["goal_lp"].append(goal_lp * alive)
            columns["manager"].append(out.manager_feat)
            columns["goal"].append(out.goal)
        finished = finished | (ids == agent.end_idx)
        if finished.all():
            break
    stacked = {k: torch.stack(v, dim=1) if v else None for k, v in columns.items()}
    mask, starts = stacked["mask"], stacked["starts"]
    ends = None
    if starts is not None:
        last = mask & ~F.pad(mask[:, 1:], (0, 1), value=False)
        ends = (F.pad(starts[:, 1:], (0, 1), value=False) | last) & mask
    return Rollout(
        stacked["tokens"],
        stacked["log_probs"],
        mask,
        stacked["entropy"],
        starts,
        ends,
        stacked["goal_lp"],
        stacked["worker"],
        stacked["manager"],
        stacked["goal"],
    )
