"""LR²PPO models: a state dict in the original key layout gives the spec's scores; attention, frame-order
(in)variance, Plackett–Luce, parameter counts at paper size, and released-layout conversions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from model.ranking.scorer import (
    CrossAttention,
    FusionScorer,
    LabelRankingConfig,
    RewardModel,
    count_trainable_parameters,
    join_ppo_state,
    plackett_luce_entropy,
    plackett_luce_log_prob,
    sample_plackett_luce,
    split_ppo_state,
)
from utilities.checkpoint import check_model_state
from utilities.config import Config
from utilities.errors import InputError

D, HEADS, FF, T, NF = 16, 2, 24, 5, 3  # width, heads, hidden, text tokens, frame slots
SMALL = dict(
    seq_length=T, max_imgs=NF, visual_feat_dim=D, text_feat_dim=D, feedforward_size=FF, xit_heads=HEADS
)


# ---- an independent implementation of the original's scorer and reward model, reading the original's keys ---


def original_state(reward: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the original's key names and shapes, written out by hand."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    def mlp(prefix, n_in):
        return {
            f"{prefix}.fc1.weight": rand(FF, n_in),
            f"{prefix}.fc1.bias": rand(FF),
            f"{prefix}.fc2.weight": rand(D, FF),
            f"{prefix}.fc2.bias": rand(D),
        }

    def ln(prefix):
        return {f"{prefix}.weight": 1 + rand(D), f"{prefix}.bias": rand(D)}

    def xit(p):
        state = {
            **ln(f"{p}.0.0.0.fn.0.ln_x"),
            **ln(f"{p}.0.0.0.fn.0.ln_y"),
            **ln(f"{p}.0.0.1.fn.0"),
            **ln(f"{p}.1.0"),
        }
        for name in ("queries", "keys", "values", "projection"):
            state[f"{p}.0.0.0.fn.1.{name}.weight"] = rand(D, D)
            state[f"{p}.0.0.0.fn.1.{name}.bias"] = rand(D)
        state.update({f"{p}.0.0.1.fn.1.0.weight": rand(FF, D), f"{p}.0.0.1.fn.1.0.bias": rand(FF)})
        state.update({f"{p}.0.0.1.fn.1.3.weight": rand(D, FF), f"{p}.0.0.1.fn.1.3.bias": rand(D)})
        return state

    state = {**mlp("text_proj", D), **mlp("img_proj", D), **xit("xit"), **mlp("out_layer", (T + NF) * D)}
    state.update({"head.weight": rand(1, D), "head.bias": rand(1)})
    if reward:
        state.update({"pos_emb.weight": rand(4, D), **xit("xitt")})
    return state


def ref_linear(s, p, x):
    return x @ s[f"{p}.weight"].T + s[f"{p}.bias"]


def ref_mlp(s, p, x):
    h = ref_linear(s, f"{p}.fc1", x)
    return ref_linear(s, f"{p}.fc2", 0.5 * h * (1 + torch.erf(h / math.sqrt(2))))


def ref_ln(s, p, x):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * s[f"{p}.weight"] + s[f"{p}.bias"]


def ref_xit(s, p, x, y, compat):
    """One sequence: x [Lq, D] attends to y [Lk, D]; per-head loop; compat = softmax(QKᵀ) / √D."""
    xh, yh = ref_ln(s, f"{p}.0.0.0.fn.0.ln_x", x), ref_ln(s, f"{p}.0.0.0.fn.0.ln_y", y)
    q, k, v = (
        ref_linear(s, f"{p}.0.0.0.fn.1.{n}", z) for n, z in (("queries", xh), ("keys", yh), ("values", yh))
    )
    dh = D // HEADS
    outs = []
    for h in range(HEADS):
        cols = slice(h * dh, (h + 1) * dh)
        energy = q[:, cols] @ k[:, cols].T
        att = (
            torch.softmax(energy, -1) / math.sqrt(D) if compat else torch.softmax(energy / math.sqrt(dh), -1)
        )
        outs.append(att @ v[:, cols])
    x1 = x + ref_linear(s, f"{p}.0.0.0.fn.1.projection", torch.cat(outs, -1))
    hidden = ref_linear(s, f"{p}.0.0.1.fn.1.0", ref_ln(s, f"{p}.0.0.1.fn.0", x1))
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    x2 = x1 + ref_linear(s, f"{p}.0.0.1.fn.1.3", hidden)
    return ref_ln(s, f"{p}.1.0", x2)


def ref_label_vector(s, text, frames, compat):
    """One label: text [T, D], frames [NF, D] → h [D]."""
    tp, ip = ref_mlp(s, "text_proj", text), ref_mlp(s, "img_proj", frames)
    z = ref_xit(s, "xit", tp, ip, compat)
    return ref_mlp(s, "out_layer", torch.cat([z, ip]).reshape(-1))


def ref_score(s, text, frames, compat):
    return ref_linear(s, "head", ref_label_vector(s, text, frames, compat))[0]


def ref_reward(s, text, frames, idx, compat):
    """Gather labels in idx order *before* the trunk, as the original."""
    u = (
        torch.stack([ref_label_vector(s, text[i], frames, compat) for i in idx])
        + s["pos_emb.weight"][: len(idx)]
    )
    return ref_linear(s, "head", ref_xit(s, "xitt", u, u, compat)[-1])[0]


def inputs(b=2, n_labels=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(b, NF, D, generator=g, dtype=torch.float64)
    text = torch.randn(b, n_labels, T, D, generator=g, dtype=torch.float64)
    return frames, text


@pytest.mark.parametrize("compat", [True, False])
def test_scorer_in_original_layout_matches_the_spec_formulas(compat):
    model = FusionScorer(**SMALL, compat_xit_attention=compat).double().eval()
    state = original_state(reward=False)
    model.load_state_dict(state)  # strict: the keys are the original's
    frames, text = inputs()
    got = model(frames, text)
    want = torch.stack(
        [torch.stack([ref_score(state, text[b, i], frames[b], compat) for i in range(3)]) for b in range(2)]
    )
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("compat", [True, False])
def test_reward_and_critic_in_original_layout_match_the_spec_formulas(compat):
    model = RewardModel(**SMALL, compat_xit_attention=compat).double().eval()
    state = original_state(reward=True)
    model.load_state_dict(state)
    frames, text = inputs(n_labels=2)
    slots = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]])
    want = torch.stack([ref_reward(state, text[b], frames[b], slots[b].tolist(), compat) for b in range(2)])
    torch.testing.assert_close(model(frames, text, slots), want, rtol=1e-9, atol=1e-9)
    critic_want = torch.stack([ref_reward(state, text[b], frames[b], [0, 1], compat) for b in range(2)])
    torch.testing.assert_close(model(frames, text), critic_want, rtol=1e-9, atol=1e-9)


def test_compat_and_standard_attention_differ():
    state = original_state(reward=False)
    frames, text = inputs()
    scores = []
    for compat in (True, False):
        model = FusionScorer(**SMALL, compat_xit_attention=compat).double().eval()
        model.load_state_dict(state)
        scores.append(model(frames, text))
    assert not torch.allclose(*scores, atol=1e-3)


def test_standard_attention_is_softmax_qk_over_sqrt_d_head_times_v():
    torch.manual_seed(0)
    attention = CrossAttention(D, HEADS).double()
    x, y = torch.randn(2, 4, D, dtype=torch.float64), torch.randn(2, 6, D, dtype=torch.float64)
    q = attention.queries(x).view(2, 4, HEADS, -1).transpose(1, 2)
    k = attention.keys(y).view(2, 6, HEADS, -1).transpose(1, 2)
    v = attention.values(y).view(2, 6, HEADS, -1).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(D // HEADS)
    want = attention.projection((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 4, D))
    torch.testing.assert_close(attention(x, y), want)


# ---- masking and frame order ---------------------------------------------------------------------------------


def test_scores_are_per_label_and_the_reward_ignores_labels_outside_its_slots():
    torch.manual_seed(0)
    scorer = FusionScorer(**SMALL).double().eval()
    frames, text = inputs(n_labels=4)
    noisy = text.clone()
    noisy[:, 2:] = 1e3 * torch.randn_like(noisy[:, 2:])
    torch.testing.assert_close(scorer(frames, noisy)[:, :2], scorer(frames, text)[:, :2])
    model = RewardModel(**SMALL).double().eval()
    frames, text = inputs(n_labels=3)
    slots = torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]])
    reward = model(frames, text, slots)
    text2 = text.clone()
    text2[:, 2] = torch.randn_like(text2[:, 2])
    torch.testing.assert_close(model(frames, text2, slots), reward)


def test_pooled_head_is_invariant_to_frame_order_and_flattened_is_not():
    torch.manual_seed(0)
    frames, text = inputs()
    permuted = frames[:, [2, 0, 1]]
    pooled = FusionScorer(**SMALL, scorer_head="pooled").double().eval()
    torch.testing.assert_close(pooled(permuted, text), pooled(frames, text))
    flattened = FusionScorer(**SMALL).double().eval()
    assert not torch.allclose(flattened(permuted, text), flattened(frames, text))


def test_pooled_head_takes_any_token_and_frame_count_and_flattened_names_the_flags():
    torch.manual_seed(0)
    pooled = FusionScorer(**SMALL, scorer_head="pooled")
    assert pooled(torch.randn(1, 7, D), torch.randn(1, 2, 9, D)).shape == (1, 2)
    with pytest.raises(InputError, match="--max_imgs"):
        FusionScorer(**SMALL)(torch.randn(1, 7, D), torch.randn(1, 2, T, D))
    with pytest.raises(InputError, match="--visual_feat_dim"):
        pooled(torch.randn(1, 3, D + 1), torch.randn(1, 2, T, D))


def test_every_parameter_but_the_key_biases_gets_a_gradient():
    """The key biases cancel in the softmax: they are not computed, get no gradient, and change no output."""
    torch.manual_seed(0)
    for model in (RewardModel(**SMALL), RewardModel(**SMALL, scorer_head="pooled")):
        frames, text = inputs(n_labels=2)
        slots = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]])
        model.float()(frames.float(), text.float(), slots).sum().backward()
        without = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert without and all(n.endswith("keys.bias") for n in without)
        model.eval()
        before = model(frames.float(), text.float(), slots)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("keys.bias"):
                    p.add_(5.0)
        torch.testing.assert_close(model(frames.float(), text.float(), slots), before)


@pytest.mark.parametrize("compat", [True, False])
def test_attention_over_one_key_is_its_value_and_trains_no_query_or_key(compat):
    """A LETOR document attends to itself: the softmax over one key is exactly 1, so the output is the key's
    value (as the full formula gives) and the query and key projections get no gradient (not rounding noise)."""
    torch.manual_seed(0)
    attention = CrossAttention(D, HEADS, compat).double()
    x = torch.randn(3, 1, D, dtype=torch.float64)
    v = attention.values(x).view(3, 1, HEADS, -1).transpose(1, 2)
    q = attention.queries(x).view(3, 1, HEADS, -1).transpose(1, 2)
    k = attention.keys(x).view(3, 1, HEADS, -1).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) * (1.0 if compat else 1 / math.sqrt(D // HEADS))
    weights = logits.softmax(-1) / (math.sqrt(D) if compat else 1.0)
    want = attention.projection((weights @ v).transpose(1, 2).reshape(3, 1, D))
    out = attention(x, x)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert attention.queries.weight.grad is None and attention.keys.weight.grad is None
    assert attention.values.weight.grad.abs().sum() > 0


# ---- Plackett–Luce ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_plackett_luce_probabilities_of_all_orders_sum_to_one(temperature):
    scores = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    orders = torch.tensor(list(itertools.permutations(range(3))))
    log_p = plackett_luce_log_prob(scores.expand(6, 3), orders, temperature=temperature)
    torch.testing.assert_close(log_p.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    s = scores[0] / temperature  # the best order by hand: e^2/(e^2+e^.3+e^-1.2) · e^.3/(e^.3+e^-1.2)
    first = orders.tolist().index([2, 0, 1])
    want = s[2] - torch.logsumexp(s, 0) + s[0] - torch.logsumexp(s[:2], 0)
    torch.testing.assert_close(log_p[first], want)


def test_plackett_luce_sampling_frequencies_and_entropy_estimate_match_the_exact_values():
    scores = torch.tensor([0.5, -0.4, 1.1, 0.0], dtype=torch.float64)
    n = 20000
    orders = sample_plackett_luce(scores.expand(n, 4), generator=torch.Generator().manual_seed(3))
    again = sample_plackett_luce(scores.expand(n, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(orders, again)
    first_freq = torch.bincount(orders[:, 0], minlength=4).double() / n
    torch.testing.assert_close(first_freq, scores.softmax(0), atol=0.015, rtol=0)
    estimate = plackett_luce_entropy(scores.expand(n, 4), orders).mean()
    orders_all = torch.tensor(list(itertools.permutations(range(4))))
    log_p = plackett_luce_log_prob(scores.expand(len(orders_all), 4), orders_all)
    exact = -(log_p.exp() * log_p).sum()  # −Σ P log P over all 24 orders
    assert abs(estimate - exact) < 0.02
    # two labels: the stage-wise entropy is exact for any order (the second step has no choice)
    pair = torch.tensor([[0.2, -0.7]])
    exact_pair = -(pair.softmax(-1) * pair.log_softmax(-1)).sum()
    torch.testing.assert_close(plackett_luce_entropy(pair, torch.tensor([[1, 0]]))[0], exact_pair)


# ---- sizes, config and released layouts ----------------------------------------------------------------------


def test_paper_sizes_have_the_original_parameter_counts():
    with torch.device("meta"):
        assert count_trainable_parameters(FusionScorer()) == 519_070_465
        assert count_trainable_parameters(RewardModel()) == 526_164_481


def test_config_reads_the_flags_and_keeps_paper_defaults_for_missing_ones():
    sizes = LabelRankingConfig.from_config(
        Config(**SMALL, compat_xit_attention=True, scorer_head="pooled", B=3)
    )
    assert sizes.seq_length == T and sizes.compat_xit_attention and sizes.scorer_head == "pooled"
    assert sizes.xit_dropout == 0.1
    assert isinstance(sizes.build_reward_model(), RewardModel)
    assert LabelRankingConfig.from_config(Config()) == LabelRankingConfig()


def test_ppo_export_import_round_trip_and_layout_errors():
    torch.manual_seed(0)
    actor, critic = FusionScorer(**SMALL).eval(), RewardModel(**SMALL).eval()
    released = join_ppo_state(actor.state_dict(), critic.state_dict())
    assert "actor.xit.0.0.0.fn.1.queries.weight" in released and "critic.pos_emb.weight" in released
    actor_state, critic_state = split_ppo_state(released, "ppo.bin")
    torch.manual_seed(1)
    actor2, critic2 = FusionScorer(**SMALL).eval(), RewardModel(**SMALL).eval()
    check_model_state(actor2, actor_state, "ppo.bin actor")
    check_model_state(critic2, critic_state, "ppo.bin critic")
    actor2.load_state_dict(actor_state)
    critic2.load_state_dict(critic_state)
    frames, text = (t.float() for t in inputs(n_labels=2))
    torch.testing.assert_close(actor2(frames, text), actor(frames, text))
    torch.testing.assert_close(critic2(frames, text), critic(frames, text))

    with pytest.raises(InputError, match=r"reward\.bin.*unexpected keys.*pos_emb\.weight"):
        check_model_state(FusionScorer(**SMALL), critic.state_dict(), "reward.bin")
    with pytest.raises(InputError, match=r"unexpected keys.*actor\."):
        check_model_state(FusionScorer(**SMALL), released, "ppo.bin")
    bad = dict(actor.state_dict())
    del bad["head.bias"]
    bad["out_layer.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(
        InputError, match=r"missing keys \(1\): head\.bias.*out_layer\.fc1\.weight: checkpoint \(3, 3\)"
    ):
        check_model_state(FusionScorer(**SMALL), bad, "pointwise.bin")
    wider = FusionScorer(**{**SMALL, "visual_feat_dim": 2 * D, "feedforward_size": 2 * FF}).state_dict()
    with pytest.raises(InputError) as err:
        check_model_state(FusionScorer(**SMALL), wider, "pointwise.bin")
    assert "it fits --visual_feat_dim 32 --feedforward_size 48 (this model: --visual_feat_dim 16 " in str(
        err.value
    )
    assert len(str(err.value)) < 300
    with pytest.raises(InputError, match=r"ppo\.bin: keys outside.*head\.bias"):
        split_ppo_state({**released, "head.bias": torch.zeros(1)}, "ppo.bin")
    with pytest.raises(InputError, match=r"no critic\.\* keys"):
        split_ppo_state(join_ppo_state(actor.state_dict(), {}), "ppo.bin")
