"""The BMHRL agent against the original's checkpoint layout and an independent forward pass written
here from the original's formulas, plus parameter counts, masking, freezing and exploration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.blocks import MultiheadedAttention
from model.captioning.bmhrl import (
    AgentConfig,
    BMHRLAgent,
    HeuristicSegmenter,
    SegmentCritic,
    expand_goals,
    load_original_state_dict,
    manager_value_function,
    trainable_parameters,
    worker_value_function,
)
from model.captioning.losses import label_smoothing_loss
from utilities.errors import InputError

# Small sizes (the paper's: 1024 / 128 / 300 / 1024 / 1024 / 512 / 64, H=4, N=2).
D_VID, D_AUD, D_CAPS, D_MODEL, FF_V, FF_A, GOAL, H, N, FF_C, V = 16, 8, 12, 16, 20, 10, 6, 4, 2, 24, 30
SMALL = AgentConfig(
    d_vid=D_VID, d_aud=D_AUD, d_model_caps=D_CAPS, d_model=D_MODEL, rl_ff_v=FF_V, rl_ff_a=FF_A, rl_goal_d=GOAL,
    rl_att_heads=H, rl_att_layers=N, dout_p=0.0,
)  # fmt: skip
PAD, START, END = 1, 2, 3


def _attention_keys(prefix: str, dq: int, dk: int, dv: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.linear_Q2d.weight": (D_MODEL, dq), f"{prefix}.linear_Q2d.bias": (D_MODEL,),
        f"{prefix}.linear_K2d.weight": (D_MODEL, dk), f"{prefix}.linear_K2d.bias": (D_MODEL,),
        f"{prefix}.linear_V2d.weight": (D_MODEL, dv), f"{prefix}.linear_V2d.bias": (D_MODEL,),
        f"{prefix}.linear_d2Q.weight": (dq, D_MODEL), f"{prefix}.linear_d2Q.bias": (dq,),
    }  # fmt: skip


def _linear(prefix: str, d_in: int, d_out: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (d_out, d_in), f"{prefix}.bias": (d_out,)}


def _norm(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}


def original_agent_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the original `bm_hrl_agent.pt`, the dead fusion feed-forward included."""
    shapes: dict[str, tuple[int, ...]] = {}
    hidden = 2 * D_CAPS
    for k in range(4):
        d_in = D_CAPS if k == 0 else hidden
        shapes |= {
            f"critic.lstm.weight_ih_l{k}": (4 * hidden, d_in),
            f"critic.lstm.weight_hh_l{k}": (4 * hidden, hidden),
        }
        shapes |= {f"critic.lstm.bias_ih_l{k}": (4 * hidden,), f"critic.lstm.bias_hh_l{k}": (4 * hidden,)}
    for k in range(2):
        shapes |= {
            f"critic.gru.weight_ih_l{k}": (3 * hidden, hidden),
            f"critic.gru.weight_hh_l{k}": (3 * hidden, hidden),
        }
        shapes |= {f"critic.gru.bias_ih_l{k}": (3 * hidden,), f"critic.gru.bias_hh_l{k}": (3 * hidden,)}
    shapes |= _linear("critic.lin", hidden, 1)
    for relu in ("relu", "relu2"):
        shapes |= {f"critic.{relu}.alpha": (1,), f"critic.{relu}.beta": (1,)}
    shapes["emb_C.embedder.weight"] = (V, D_CAPS)
    for i in range(N):
        p = f"bm_enc.encoder.layers.{i}"
        shapes |= _attention_keys(f"{p}.self_att_M1", D_VID, D_VID, D_VID)
        shapes |= _attention_keys(f"{p}.self_att_M2", D_AUD, D_AUD, D_AUD)
        shapes |= _attention_keys(f"{p}.bi_modal_att_M1", D_VID, D_AUD, D_AUD)
        shapes |= _attention_keys(f"{p}.bi_modal_att_M2", D_AUD, D_VID, D_VID)
        shapes |= _linear(f"{p}.feed_forward_M1.fc1", D_VID, FF_V) | _linear(
            f"{p}.feed_forward_M1.fc2", FF_V, D_VID
        )
        shapes |= _linear(f"{p}.feed_forward_M2.fc1", D_AUD, FF_A) | _linear(
            f"{p}.feed_forward_M2.fc2", FF_A, D_AUD
        )
        for j in range(3):
            shapes |= _norm(f"{p}.res_layers_M1.{j}.norm", D_VID) | _norm(
                f"{p}.res_layers_M2.{j}.norm", D_AUD
            )
    for stack in ("bm_worker_fus", "bm_manager_fus"):
        for i in range(N):
            p = f"{stack}.decoder.layers.{i}"
            shapes |= _attention_keys(f"{p}.self_att", D_CAPS, D_CAPS, D_CAPS)
            shapes |= _attention_keys(f"{p}.enc_att_A", D_CAPS, D_AUD, D_AUD)
            shapes |= _attention_keys(f"{p}.enc_att_V", D_CAPS, D_VID, D_VID)
            shapes |= _linear(f"{p}.feed_forward.fc1", D_CAPS, FF_C) | _linear(
                f"{p}.feed_forward.fc2", FF_C, D_CAPS
            )
            for norm in ("res_layer_self_att.norm", "res_layer_enc_att_A.norm", "res_layer_enc_att_V.norm"):
                shapes |= _norm(f"{p}.{norm}", D_CAPS)
            shapes |= _norm(f"{p}.normCA", D_CAPS) | _norm(f"{p}.normCV", D_CAPS)
            shapes[f"{p}.a_v_constant"] = (1,)
    shapes |= _linear("manager.linear", D_CAPS, GOAL)
    shapes |= _linear("worker.projection", D_CAPS + GOAL, V)
    shapes |= _attention_keys("worker.goal_attention", GOAL, D_CAPS, D_CAPS)
    return shapes


def is_dead(key: str) -> bool:
    return ".feed_forward.fc" in key and "_fus." in key


def original_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in original_agent_shapes().items():
        fan_in = shape[-1] if len(shape) > 1 else 4
        state[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        if key.endswith("norm.weight") or key.split(".")[-2] in ("normCA", "normCV"):
            state[key] = 1 + 0.1 * state[key]
    state["emb_C.embedder.weight"] = torch.randn(V, D_CAPS, generator=g) / math.sqrt(D_CAPS)
    for key in state:
        if key.endswith("a_v_constant"):
            state[key] = torch.tensor([0.7])
    state["critic.relu.alpha"], state["critic.relu.beta"] = torch.tensor([0.9]), torch.tensor([2.0])
    state["critic.relu2.alpha"], state["critic.relu2.beta"] = torch.tensor([0.3]), torch.tensor([-1.0])
    for key in state:  # a critic driven by the current word, its logits spread around the threshold
        if key.startswith(("critic.lstm.", "critic.gru.")):
            state[key] = state[key] * (0 if "bias" in key else 0.1 if "weight_hh" in key else 3)
    state["critic.lin.weight"] = state["critic.lin.weight"] * 3
    state["critic.lin.bias"] = torch.tensor([-1.85])
    return state


# ---- the independent forward pass, straight from the formulas ----------------------------------------------
def ref_linear(sd, p, x):
    return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]


def ref_layer_norm(sd, p, x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[f"{p}.weight"] + sd[f"{p}.bias"]


def ref_attention(sd, p, Q, K, Vv, mask, heads):
    """mask (B, 1 or Sq, Sk) bool; softmax(QKᵀ/√d_k) masked with −inf; heads concatenated; back to dQ."""
    q, k, v = (
        ref_linear(sd, f"{p}.linear_Q2d", Q),
        ref_linear(sd, f"{p}.linear_K2d", K),
        ref_linear(sd, f"{p}.linear_V2d", Vv),
    )
    D = q.shape[-1]
    dk = D // heads
    out = torch.zeros_like(q)
    for h in range(heads):
        cols = slice(h * dk, (h + 1) * dk)
        scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(dk)
        scores = scores.masked_fill(~mask, float("-inf"))
        out[..., cols] = torch.softmax(scores, -1) @ v[..., cols]
    return ref_linear(sd, f"{p}.linear_d2Q", out)


def ref_positional(x):
    S, d = x.shape[1], x.shape[2]
    table = torch.zeros(S, d, dtype=torch.float64)
    for pos in range(S):
        for i in range(d):
            angle = pos / 10000 ** (i / d)
            table[pos, i] = math.sin(angle) if i % 2 == 0 else math.cos(angle)
    return x + table.float()


def ref_lstm_layer(x, w_ih, w_hh, b_ih, b_hh):
    B, L, _ = x.shape
    hidden = w_hh.shape[1]
    h, c, outs = torch.zeros(B, hidden), torch.zeros(B, hidden), []
    for t in range(L):
        i, f, g, o = (x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, 1)


def ref_gru_layer(x, w_ih, w_hh, b_ih, b_hh):
    B, L, _ = x.shape
    h, outs = torch.zeros(B, w_hh.shape[1]), []
    for t in range(L):
        xr, xz, xn = (x[:, t] @ w_ih.T + b_ih).chunk(3, -1)
        hr, hz, hn = (h @ w_hh.T + b_hh).chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs, 1)


def ref_arelu(sd, p, x):
    return F.relu(x) * (1 + torch.sigmoid(sd[f"{p}.beta"])) - F.relu(-x) * sd[f"{p}.alpha"].clamp(0.01, 0.99)


def ref_critic_labels(sd, embedded, threshold=0.25):
    x = embedded
    for k in range(4):
        x = ref_lstm_layer(
            x, *(sd[f"critic.lstm.{w}_l{k}"] for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        )
    x = ref_arelu(sd, "critic.relu", x)
    for k in range(2):
        x = ref_gru_layer(
            x, *(sd[f"critic.gru.{w}_l{k}"] for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        )
    x = ref_arelu(sd, "critic.relu2", x)
    return torch.sigmoid(ref_linear(sd, "critic.lin", x)[..., 0]) > threshold


def ref_agent(sd, video, video_mask, audio, audio_mask, captions):
    """log-probs (B, L, V) and critic labels (B, L) of the original agent (eval mode: no dropout)."""
    vm, am = video_mask[:, None, :], audio_mask[:, None, :]
    L = captions.shape[1]
    C_mask = (captions != PAD)[:, None, :] & torch.ones(L, L, dtype=torch.bool).tril()[None]
    C = sd["emb_C.embedder.weight"][captions] * math.sqrt(D_CAPS)
    labels = ref_critic_labels(sd, C)
    C = ref_positional(C)
    M1, M2 = ref_positional(video), ref_positional(audio)
    for i in range(N):
        p = f"bm_enc.encoder.layers.{i}"
        n = ref_layer_norm(sd, f"{p}.res_layers_M1.0.norm", M1)
        M1 = M1 + ref_attention(sd, f"{p}.self_att_M1", n, n, n, vm, H)
        n = ref_layer_norm(sd, f"{p}.res_layers_M2.0.norm", M2)
        M2 = M2 + ref_attention(sd, f"{p}.self_att_M2", n, n, n, am, H)
        n1, n2 = (
            ref_layer_norm(sd, f"{p}.res_layers_M1.1.norm", M1),
            ref_layer_norm(sd, f"{p}.res_layers_M2.1.norm", M2),
        )
        M1x = M1 + ref_attention(sd, f"{p}.bi_modal_att_M1", n1, M2, M2, am, H)
        M2x = M2 + ref_attention(sd, f"{p}.bi_modal_att_M2", n2, M1, M1, vm, H)
        n1, n2 = (
            ref_layer_norm(sd, f"{p}.res_layers_M1.2.norm", M1x),
            ref_layer_norm(sd, f"{p}.res_layers_M2.2.norm", M2x),
        )
        M1 = M1x + ref_linear(
            sd, f"{p}.feed_forward_M1.fc2", F.relu(ref_linear(sd, f"{p}.feed_forward_M1.fc1", n1))
        )
        M2 = M2x + ref_linear(
            sd, f"{p}.feed_forward_M2.fc2", F.relu(ref_linear(sd, f"{p}.feed_forward_M2.fc1", n2))
        )
    Va, Av = M1, M2

    def fusion(stack):
        X = C
        for i in range(N):
            p = f"{stack}.decoder.layers.{i}"
            n = ref_layer_norm(sd, f"{p}.res_layer_self_att.norm", X)
            X = X + ref_attention(sd, f"{p}.self_att", n, n, n, C_mask, H)
            n = ref_layer_norm(sd, f"{p}.res_layer_enc_att_A.norm", X)
            Ca = ref_layer_norm(sd, f"{p}.normCA", X + ref_attention(sd, f"{p}.enc_att_A", n, Av, Av, am, H))
            n = ref_layer_norm(sd, f"{p}.res_layer_enc_att_V.norm", X)
            Cv = ref_layer_norm(sd, f"{p}.normCV", X + ref_attention(sd, f"{p}.enc_att_V", n, Va, Va, vm, H))
            lam = torch.sigmoid(sd[f"{p}.a_v_constant"].clamp(-2, 2))
            X = lam * Cv + (1 - lam) * Ca
        return X

    worker_feat, manager_feat = fusion("bm_worker_fus"), fusion("bm_manager_fus")
    g = ref_linear(sd, "manager.linear", manager_feat)
    goals = g.clone()
    for b in range(g.shape[0]):  # the original's double loop: a new goal after every flagged token
        for t in range(1, L):
            goals[b, t] = g[b, t] if labels[b, t - 1] else goals[b, t - 1]
    c = ref_attention(sd, "worker.goal_attention", goals, worker_feat, worker_feat, C_mask, 2)
    logits = ref_linear(sd, "worker.projection", torch.cat((worker_feat, c), -1))
    return torch.log_softmax(logits, -1), labels


def make_inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    video, audio = torch.randn(B, 7, D_VID, generator=g), torch.randn(B, 9, D_AUD, generator=g)
    video_mask = torch.arange(7)[None] < torch.tensor([7, 4, 6, 5, 3][:B])[:, None]
    audio_mask = torch.arange(9)[None] < torch.tensor([9, 9, 2, 7, 5][:B])[:, None]
    captions = torch.randint(4, V, (B, 8), generator=g)
    captions[:, 0] = START
    lengths = [8, 5, 6, 7, 3][:B]
    for b, n in enumerate(lengths):
        captions[b, n - 1] = END
        captions[b, n:] = PAD
    return video, video_mask, audio, audio_mask, captions


def loaded_agent(seed=0, **cfg) -> BMHRLAgent:
    agent = BMHRLAgent(V, AgentConfig(**{**SMALL.__dict__, **cfg}))
    load_original_state_dict(agent, original_state_dict(seed), "test")
    return agent.eval()


def test_original_state_dict_loads_and_equals_independent_forward():
    state = original_state_dict()
    agent = BMHRLAgent(V, SMALL)
    dropped = load_original_state_dict(agent, state, "bm_hrl_agent.pt")
    assert dropped == sorted(k for k in state if is_dead(k)) and len(dropped) == 2 * N * 4
    agent.eval()
    inputs = make_inputs()
    out = agent(*inputs)
    expected, labels = ref_agent(state, *inputs)
    assert labels.any() and not labels.all(), "the test must exercise goal switching"
    torch.testing.assert_close(out.log_probs, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.goal_starts[:, 1:], labels[:, :-1])
    assert out.goal_starts[:, 0].all()


def test_state_dict_keys_are_the_originals_minus_the_dead_feed_forward():
    shapes = original_agent_shapes()
    ours = {k: tuple(v.shape) for k, v in BMHRLAgent(V, SMALL).state_dict().items()}
    assert ours == {k: s for k, s in shapes.items() if not is_dead(k)}
    critic = {k: tuple(v.shape) for k, v in SegmentCritic(D_CAPS).state_dict().items()}
    assert critic == {k.removeprefix("critic."): s for k, s in shapes.items() if k.startswith("critic.")}
    value_keys = {"value_function.fc1.weight", "value_function.fc1.bias", "value_function.fc2.weight",
                  "value_function.fc2.bias", "projection.weight", "projection.bias"}  # fmt: skip
    assert set(worker_value_function(SMALL).state_dict()) == value_keys
    assert set(manager_value_function(SMALL).state_dict()) == value_keys
    assert worker_value_function(SMALL).state_dict()["value_function.fc1.weight"].shape == (
        2 * (D_CAPS + GOAL),
        D_CAPS + GOAL,
    )


def test_paper_size_parameter_counts():
    vocab = 10172
    with torch.device("meta"):
        agent = BMHRLAgent(vocab)
        worker_vf, manager_vf = worker_value_function(), manager_value_function()
    assert trainable_parameters(agent) == 43_467_124 + 365 * vocab
    assert sum(p.numel() for p in agent.critic.parameters()) == 15_147_005
    assert not any(p.requires_grad for p in agent.critic.parameters())
    assert not agent.emb_C.embedder.weight.requires_grad
    assert trainable_parameters(worker_vf) == 531_441 and trainable_parameters(manager_vf) == 361_201


def test_a_checkpoint_of_other_sizes_names_the_size_flags_that_fit_not_the_keys():
    other = AgentConfig(**{**SMALL.__dict__, "d_model": 2 * D_MODEL, "rl_goal_d": 7, "rl_att_layers": 1})
    state = BMHRLAgent(V, other).state_dict()
    with pytest.raises(InputError) as err:
        load_original_state_dict(BMHRLAgent(V, SMALL), state, "ckpt")
    message = str(err.value)
    assert message.startswith("ckpt does not fit the model: it was saved at other sizes: it fits ")
    assert (
        "fits --d_model 32 --rl_goal_d 7 --rl_att_layers 1 (this model: --d_model 16 --rl_goal_d 6 "
        in message
    )
    assert len(message) < 250
    wide_critic = SegmentCritic(2 * D_CAPS).state_dict()
    with pytest.raises(
        InputError, match=r"critic\.cp .*it fits --d_model_caps 24 \(this model: --d_model_caps 12"
    ):
        load_original_state_dict(SegmentCritic(D_CAPS), wide_critic, "critic.cp")


def test_loading_reports_bad_keys_shapes_and_vocabulary():
    agent = BMHRLAgent(V, SMALL)
    state = original_state_dict()
    missing = {k: v for k, v in state.items() if k != "manager.linear.bias"}
    with pytest.raises(InputError, match=r"ckpt.*missing keys \(1\): manager\.linear\.bias"):
        load_original_state_dict(agent, missing, "ckpt")
    with pytest.raises(InputError, match=r"unexpected keys \(1\): extra\.weight"):
        load_original_state_dict(agent, {**state, "extra.weight": torch.zeros(1)}, "ckpt")
    with pytest.raises(InputError, match=r"mis-shaped \(1\): relu\.alpha: checkpoint \(2,\) vs model \(1,\)"):
        critic_state = {k.removeprefix("critic."): v for k, v in state.items() if k.startswith("critic.")}
        load_original_state_dict(agent.critic, {**critic_state, "relu.alpha": torch.zeros(2)}, "ckpt")
    wrong_vocab = {**state, "emb_C.embedder.weight": torch.zeros(V + 1, D_CAPS)}
    with pytest.raises(InputError, match=rf"vocabulary has {V + 1} tokens.*ours has {V}"):
        load_original_state_dict(agent, wrong_vocab, "ckpt")
    prefixed = {f"module.{k}": v for k, v in state.items()}
    load_original_state_dict(agent, prefixed, "ckpt")  # DataParallel prefix accepted


def test_padding_of_features_and_captions_does_not_change_outputs():
    agent = loaded_agent()
    video, video_mask, audio, audio_mask, captions = make_inputs()
    out = agent(video, video_mask, audio, audio_mask, captions).log_probs
    g = torch.Generator().manual_seed(5)
    more_video = torch.cat((video, 100 * torch.randn(3, 4, D_VID, generator=g)), 1)
    more_audio = torch.cat((audio, 100 * torch.randn(3, 2, D_AUD, generator=g)), 1)
    vm, am = F.pad(video_mask, (0, 4)), F.pad(audio_mask, (0, 2))
    more_captions = F.pad(captions, (0, 3), value=PAD)
    padded = agent(more_video, vm, more_audio, am, more_captions).log_probs
    real = captions != PAD
    torch.testing.assert_close(padded[:, :8][real], out[real], rtol=1e-4, atol=1e-5)
    # a row's outputs do not depend on the other rows (batch size 1 included)
    single = agent(video[1:2], video_mask[1:2], audio[1:2], audio_mask[1:2], captions[1:2]).log_probs
    torch.testing.assert_close(single[real[1:2]], out[1:2][real[1:2]], rtol=1e-4, atol=1e-5)


def test_frozen_critic_and_embeddings_get_no_gradient():
    agent = loaded_agent(dout_p=0.1).train()
    agent.set_phase("warm_start")
    video, video_mask, audio, audio_mask, captions = make_inputs()
    out = agent(video, video_mask, audio, audio_mask, captions[:, :-1])
    label_smoothing_loss(out.log_probs, captions[:, 1:], PAD, 0.7).backward()
    assert all(p.grad is None for p in agent.critic.parameters())
    assert agent.emb_C.embedder.weight.grad is None
    for name, p in agent.named_parameters():
        if name.endswith(
            "linear_K2d.bias"
        ):  # cancels in the softmax: left out of the computation (blocks.py)
            assert p.grad is None, name
        elif not name.startswith(("critic.", "emb_C.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_the_key_bias_has_no_effect_on_attention():
    """Why `project_kv` leaves the key projection's bias out: the same attention with it gives the same output."""
    torch.manual_seed(0)
    att = MultiheadedAttention(6, 5, 5, H=2, dout_p=0.0, d_model=8).eval()
    Q, K = torch.randn(2, 3, 6), torch.randn(2, 4, 5)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])[:, None, :]
    without = att(Q, K, K, mask)
    k = att._heads(att.linear_K2d(K))  # with the bias
    q = att._heads(att.linear_Q2d(Q))
    v = att._heads(att.linear_V2d(K))
    with_bias = (
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]).transpose(1, 2).reshape(2, 3, 8)
    )
    torch.testing.assert_close(att.linear_d2Q(with_bias), without, rtol=1e-5, atol=1e-6)


def test_phases_freeze_the_other_side():
    agent = loaded_agent()
    agent.set_phase("worker")
    assert not any(p.requires_grad for p in agent.manager.parameters())
    assert all(p.requires_grad for p in agent.bm_enc.parameters()) and not agent.exploration
    agent.set_phase("manager")
    assert all(p.requires_grad for p in agent.bm_manager_fus.parameters()) and agent.exploration
    assert not any(p.requires_grad for p in agent.worker.parameters())
    assert not any(p.requires_grad for p in agent.bm_enc.parameters())
    assert not any(p.requires_grad for p in agent.critic.parameters())


def test_exploration_is_seeded_by_the_agents_generator_and_only_in_training():
    agent = loaded_agent()
    inputs = make_inputs()
    plain = agent(*inputs).log_probs
    agent.set_phase("manager")
    assert torch.equal(agent(*inputs).log_probs, plain), "no exploration in eval mode"
    agent.train()
    agent.rng.manual_seed(3)
    first = agent(*inputs)
    agent.rng.manual_seed(3)
    second = agent(*inputs)
    assert torch.equal(first.log_probs, second.log_probs) and not torch.allclose(first.log_probs, plain)
    agent.set_phase("worker")
    drawn = agent.rng.get_state()
    agent(*inputs)
    assert torch.equal(agent.rng.get_state(), drawn), "the worker phase does not explore"


def test_expand_goals_holds_each_goal_until_the_next_start():
    goals = torch.arange(2 * 5, dtype=torch.float).view(2, 5, 1).requires_grad_()
    starts = torch.tensor([[1, 0, 1, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    held = expand_goals(goals, starts)
    assert held[..., 0].tolist() == [[0, 0, 2, 3, 3], [5, 5, 5, 5, 9]]
    held.sum().backward()
    assert goals.grad[..., 0].tolist() == [[2, 0, 1, 2, 0], [4, 0, 0, 0, 1]]


def test_heuristic_segmenter_rule_full_and_stepwise():
    itos = [
        " UNK ",
        "<blank>",
        "<s>",
        "</s>",
        "a",
        "man",
        "walks",
        "in",
        ",",
        "and",
        "then",
        "sits",
        "down",
        ".",
    ]
    segmenter = HeuristicSegmenter(itos, (PAD, START, END))
    words = ["<s>", "a", "man", "walks", "in", ",", "and", "then", "sits", "down", ".", "</s>"]
    ids = torch.tensor([[itos.index(w) for w in words]])
    ends = segmenter.segment_ends(ids)[0]
    assert [w for w, e in zip(words, ends, strict=True) if e] == [",", "and", "."]
    for timing, new_goal_at in (("original", ["and", "then", "</s>"]), ("aligned", [",", "then", "."])):
        starts = segmenter.goal_starts(ids, None, timing)[0]
        assert [w for w, s in zip(words, starts, strict=True) if s] == new_goal_at
        state = segmenter.start(1, "cpu")
        stepwise = [segmenter.step(ids[:, t], None, state, timing)[0].item() for t in range(ids.shape[1])]
        assert stepwise == starts.tolist()
    assert segmenter.goal_starts(ids, None, "original")[0, 1:].tolist() == ends[:-1].tolist()


def test_goal_timing_decides_which_output_a_segment_end_switches_the_goal_for():
    """Input t = 3 (",") ends a segment. Output k is generated at decoder position k − 1 from inputs 0 … k − 1:
    'aligned' takes the new goal for output t + 1 ("sits", the new clause's first word), 'original' only for
    output t + 2 ("down")."""
    itos = [" UNK ", "<blank>", "<s>", "</s>", "a", "man", "walks", ",", "sits", "down", *"abcdefghij"]
    words = ["<s>", "a", "man", "walks", ",", "sits", "down", "</s>"]
    ids = torch.tensor([[itos.index(w) for w in words]])
    t = words.index(",")
    inputs = make_inputs(B=1)[:4]
    for timing, first_output in (("aligned", t + 1), ("original", t + 2)):
        torch.manual_seed(0)
        cfg = AgentConfig(**{**SMALL.__dict__, "segmenter": "heuristic", "goal_timing": timing})
        agent = BMHRLAgent(len(itos), cfg, word_vectors=torch.randn(len(itos), D_CAPS), itos=itos).eval()
        out = agent(*inputs, ids[:, :-1])
        # the goal that generates output k is held at decoder position k - 1
        new_goal_for = [k + 1 for k in out.goal_starts[0].nonzero()[:, 0].tolist()]
        assert new_goal_for == [1, first_output]
        held = out.goals[0]
        assert torch.equal(held[first_output - 2], held[0])
        assert not torch.equal(held[first_output - 1], held[0])


def test_heuristic_agent_and_ablations_run_with_batch_size_one():
    itos = [" UNK ", "<blank>", "<s>", "</s>", ",", ".", "and", "then", *[f"w{i}" for i in range(V - 8)]]
    video, video_mask, audio, audio_mask, captions = make_inputs(B=1)
    for cfg in (dict(segmenter="heuristic"), dict(mode="AHRL"), dict(mode="VHRL"), dict(mode="BM")):
        agent = BMHRLAgent(V, AgentConfig(**{**SMALL.__dict__, **cfg}), itos=itos).eval()
        out = agent(video, video_mask, audio, audio_mask, captions)
        assert out.log_probs.shape == (1, 8, V)
        torch.testing.assert_close(out.log_probs.exp().sum(-1), torch.ones(1, 8))
        assert (out.goals is None) == (cfg.get("mode") == "BM")


def test_agent_config_from_flags():
    class Flags:
        mode, d_model, rl_att_heads, dout_p, unrelated = "eval", 512, 8, 0.2, 1

    cfg = AgentConfig.from_config(Flags)
    assert (cfg.mode, cfg.d_model, cfg.rl_att_heads, cfg.dout_p, cfg.rl_goal_d) == ("BMHRL", 512, 8, 0.2, 64)
    with pytest.raises(InputError, match="segmenter"):
        AgentConfig(segmenter="nope")


def test_label_smoothing_loss_by_hand():
    log_probs = torch.log_softmax(torch.tensor([[[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0]]]), -1)
    targets = torch.tensor([[2, PAD]])
    eps, p = 0.4, log_probs[0, 0].exp()
    q = torch.tensor([eps / 2, 0.0, 1 - eps, eps / 2])  # pad (index 1) gets 0; V − 2 = 2 others share ε
    expected = sum(q[v] * (math.log(q[v]) - math.log(p[v])) for v in (0, 2, 3))
    torch.testing.assert_close(label_smoothing_loss(log_probs, targets, PAD, eps), expected)
