"""LR²PPO's models: the XiT cross-attention block, the fusion scorer S(text, frames) and the reward model / critic.

The scorer rates every candidate label of a clip from the label's token features and the clip's frame features
(the original's scorer); it is the pointwise model and the PPO actor. The reward model shares the scorer's trunk, gathers the
label vectors into a slot sequence (`[ctx_a, ctx_b, ranked_1st, ranked_2nd]` for a pair), adds a slot embedding,
runs a self-attention XiT over the slots and reads one scalar at the last slot. The critic is the same
module called on the context slots only.

Shapes: frames `[B, F, visual_feat_dim]` once per clip, label text `[B, L, T, text_feat_dim]`. The frames are
projected once per clip and every label's text tokens attend to the same keys/values (the L labels are folded into
the query axis), so nothing is repeated per label.

State-dict keys equal the original's (`text_proj.*`, `img_proj.*`, `xit.0.0.0.fn.1.queries.*`, …, `pos_emb.weight`,
`xitt.*`, `head.*`), so a released `.bin` loads with `load_state_dict`; `split_ppo_state` and `join_ppo_state`
move between the released PPO layout and ours with clear errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utilities.config import settings_for
from utilities.errors import InputError
from utilities.seeding import RowStreams

ScorerHead = Literal["flattened", "pooled"]
Inputs = Literal["clips", "vectors"]


class Mlp(nn.Module):
    """Linear → GELU → Linear (the original's dropouts have p = 0 and are left out; they hold no parameters)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class NormPair(nn.Module):
    """Separate LayerNorms for the query side x and the key/value side y."""

    def __init__(self, dim: int):
        super().__init__()
        self.ln_x = nn.LayerNorm(dim)
        self.ln_y = nn.LayerNorm(dim)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.ln_x(x), self.ln_y(y)


class CrossAttention(nn.Module):
    """Multi-head attention of x's tokens over y's tokens on torch SDPA: softmax(QKᵀ/√d_head)V.

    `compat_xit_attention=True` reproduces the original instead: no scaling of the logits and the probabilities
    divided by √dim after the softmax. Since (A/c)V = (AV)/c this is SDPA with scale 1 and the
    output divided by √dim. Use it only to run weights trained that way (the released checkpoints).
    """

    def __init__(self, dim: int, num_heads: int, compat_xit_attention: bool = False):
        super().__init__()
        if dim % num_heads:
            raise InputError(f"--visual_feat_dim {dim} is not divisible by --xit_heads {num_heads}")
        self.num_heads = num_heads
        self.compat_xit_attention = compat_xit_attention
        self.queries = nn.Linear(dim, dim)
        self.keys = nn.Linear(dim, dim)
        self.values = nn.Linear(dim, dim)
        self.projection = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x `[N, Lq, dim]` attends over y `[N, Lk, dim]`.

        What the softmax cancels is not computed, so it gets no gradient: the key projection's bias (it adds the
        same q·b to every score of a query) and, over a single key (a LETOR document attending to itself), the
        queries and keys altogether (the one weight is exactly 1: the output is that key's value). Computed, they
        got gradients of pure rounding noise that Adam turned into a random walk of up to ±lr per step,
        different on 1 and N processes. They stay as initialised or loaded (kept for the checkpoint layout)."""
        n, lq, dim = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(n, t.shape[1], self.num_heads, dim // self.num_heads).transpose(1, 2)

        v = heads(self.values(y))
        if y.shape[1] == 1:
            out = v.expand(-1, -1, lq, -1) / (math.sqrt(dim) if self.compat_xit_attention else 1.0)
            return self.projection(out.transpose(1, 2).reshape(n, lq, dim))
        q, k = heads(self.queries(x)), heads(F.linear(y, self.keys.weight))
        if self.compat_xit_attention:
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0) / math.sqrt(dim)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.projection(out.transpose(1, 2).reshape(n, lq, dim))


class _Residual(nn.Module):
    """Holds one residual branch under the name `fn` (the original's key nesting)."""

    def __init__(self, fn: nn.Sequential):
        super().__init__()
        self.fn = fn


class XiT(nn.Module):
    """One pre-LayerNorm cross-attention transformer block and a final LayerNorm.

    x₁ = x + Dropout(Attn(LN_x(x), LN_y(y)));  x₂ = x₁ + Dropout(FFN(LN(x₁)));  out = LN(x₂).
    The residual adds the un-normalised x. Self-attention is XiT(u, u). The submodules sit at the original's
    state-dict names: `0.0.0.fn` the attention branch, `0.0.1.fn` the feed-forward branch, `1.0` the final norm.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        feedforward_size: int,
        dropout: float,
        compat_xit_attention: bool = False,
    ):
        super().__init__()
        attention = nn.Sequential(
            NormPair(dim), CrossAttention(dim, num_heads, compat_xit_attention), nn.Dropout(dropout)
        )
        feed_forward = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Sequential(
                nn.Linear(dim, feedforward_size),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(feedforward_size, dim),
            ),
            nn.Dropout(dropout),
        )
        self.add_module("0", nn.ModuleList([nn.ModuleList([_Residual(attention), _Residual(feed_forward)])]))
        self.add_module("1", nn.ModuleList([nn.LayerNorm(dim)]))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x `[N, Lq, dim]`, y `[N, Lk, dim]` → `[N, Lq, dim]`."""
        norms, attention, dropout = self.get_submodule("0.0.0.fn")
        x = x + dropout(attention(*norms(x, y)))
        x = x + self.get_submodule("0.0.1.fn")(x)
        return self.get_submodule("1.0")(x)


class AttentionPool(nn.Module):
    """Softmax-weighted mean over tokens with one learned query; starts as the plain mean."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x `[..., N, dim]` → `[..., dim]`; invariant to the token order."""
        logits = x @ self.query / math.sqrt(x.shape[-1])
        return (logits.softmax(-1).unsqueeze(-1) * x).sum(-2)


class FusionTrunk(nn.Module):
    """S's trunk: per label, text tokens attend to the clip's frames; one vector per label.

    `scorer_head="flattened"` (the paper's): concat(Z, Iₚ) `[T+F, d]` flattened into `out_layer`; depends on
    the frame order and needs exactly `seq_length` tokens and `max_imgs` frames. `"pooled"`: attention-pooled
    text tokens and frames, concatenated (`[2d]`) into a small `out_layer`; invariant to the frame order.
    """

    # The keys whose shapes give the size flags (utilities.checkpoint.SizeKey), for the error when a checkpoint
    # of other sizes is loaded. `out_layer.fc1.weight` mixes --seq_length, --max_imgs and d, so it is not one.
    SIZE_KEYS = (
        ("visual_feat_dim", "img_proj.fc1.weight", 1),
        ("text_feat_dim", "text_proj.fc1.weight", 1),
        ("feedforward_size", "text_proj.fc1.weight", 0),
    )

    def __init__(
        self,
        seq_length: int = 196,
        max_imgs: int = 16,
        visual_feat_dim: int = 768,
        text_feat_dim: int = 768,
        feedforward_size: int = 3072,
        xit_heads: int = 8,
        xit_dropout: float = 0.1,
        compat_xit_attention: bool = False,
        scorer_head: ScorerHead = "flattened",
        inputs: Inputs = "clips",
    ):
        super().__init__()
        if scorer_head not in ("flattened", "pooled"):
            raise InputError(f"--scorer_head must be 'flattened' or 'pooled', got {scorer_head!r}")
        self.seq_length, self.max_imgs, self.scorer_head = seq_length, max_imgs, scorer_head
        self.visual_feat_dim, self.text_feat_dim = visual_feat_dim, text_feat_dim
        self.feedforward_size, self.xit_heads, self.xit_dropout = feedforward_size, xit_heads, xit_dropout
        self.compat_xit_attention, self.inputs = compat_xit_attention, inputs
        d = visual_feat_dim
        if inputs == "vectors":  # LETOR: each document vector is a 1-token sequence, no input MLPs
            self.xit = XiT(d, xit_heads, feedforward_size, xit_dropout, compat_xit_attention)
            self.out_layer = Mlp(2 * d, feedforward_size, d)
            return
        self.text_proj = Mlp(text_feat_dim, feedforward_size, d)
        self.img_proj = Mlp(visual_feat_dim, feedforward_size, d)
        self.xit = XiT(d, xit_heads, feedforward_size, xit_dropout, compat_xit_attention)
        if scorer_head == "flattened":
            self.out_layer = Mlp((seq_length + max_imgs) * d, feedforward_size, d)
        else:
            self.text_pool = AttentionPool(d)
            self.frame_pool = AttentionPool(d)
            self.out_layer = Mlp(2 * d, feedforward_size, d)

    def label_features(self, frames: Tensor, text: Tensor) -> Tensor:
        """frames `[B, F, visual_feat_dim]`, text `[B, L, T, text_feat_dim]` → `[B, L, d]`. With vectors
        (LETOR) text is `[B, L, 1, d]` (one document per label slot) and frames are not used."""
        if self.inputs == "vectors":
            return self._document_features(text)
        self._check_inputs(frames, text)
        b, n_labels, n_tokens, _ = text.shape
        n_frames = frames.shape[1]
        img = self.img_proj(frames)
        tokens = self.xit(self.text_proj(text).flatten(1, 2), img).view(b, n_labels, n_tokens, -1)
        if self.scorer_head == "pooled":
            frame_vec = self.frame_pool(img).unsqueeze(1).expand(-1, n_labels, -1)
            return self.out_layer(torch.cat([self.text_pool(tokens), frame_vec], dim=-1))
        img = img.reshape(b, 1, n_frames * img.shape[-1]).expand(-1, n_labels, -1)
        return self.out_layer(torch.cat([tokens.flatten(2), img], dim=-1))

    def _document_features(self, documents: Tensor) -> Tensor:
        """`[B, L, 1, d]` → `[B, L, d]`: out_layer(concat(XiT(x, x), x)); with one key the attention's softmax is 1,
        so each document is scored on its own."""
        if documents.dim() != 4 or documents.shape[2] != 1 or documents.shape[3] != self.visual_feat_dim:
            raise InputError(
                f"expected document vectors [B, L, 1, {self.visual_feat_dim}]; got {list(documents.shape)}"
            )
        x = documents.flatten(0, 1)
        z = self.xit(x, x)
        return self.out_layer(torch.cat([z, x], dim=-1)).view(*documents.shape[:2], -1)

    def _check_inputs(self, frames: Tensor, text: Tensor) -> None:
        if frames.dim() != 3 or text.dim() != 4 or frames.shape[0] != text.shape[0]:
            raise InputError(
                f"expected frames [B, F, d] and text [B, L, T, d]; got {list(frames.shape)} and {list(text.shape)}"
            )
        if frames.shape[-1] != self.visual_feat_dim:
            raise InputError(
                f"frame features are {frames.shape[-1]}-d but --visual_feat_dim is {self.visual_feat_dim}"
            )
        if text.shape[-1] != self.text_feat_dim:
            raise InputError(
                f"text features are {text.shape[-1]}-d but --text_feat_dim is {self.text_feat_dim}"
            )
        got, want = (text.shape[2], frames.shape[1]), (self.seq_length, self.max_imgs)
        if self.scorer_head == "flattened" and got != want:
            raise InputError(
                f"the flattened head needs {want[0]} text tokens (--seq_length) and {want[1]} frames (--max_imgs); "
                f"got {got[0]} tokens and {got[1]} frames"
            )


class FusionScorer(FusionTrunk):
    """S(text, frames): one relevance score per label; the pointwise model and the PPO actor.

    `sizes` are FusionTrunk's keyword arguments (LabelRankingConfig's fields).
    """

    def __init__(self, **sizes: Any):
        super().__init__(**sizes)
        self.head = nn.Linear(self.visual_feat_dim, 1)

    def forward(self, frames: Tensor, text: Tensor) -> Tensor:
        """Scores `[B, L]`; labels are scored independently (a padded label's score means nothing)."""
        return self.head(self.label_features(frames, text)).squeeze(-1)

    def shift_parameters(self) -> list[nn.Parameter]:
        """The biases that add the same amount to every label's score (`out_layer`'s last bias feeds `head`
        directly). An objective of score differences (Plackett–Luce, the pairwise PPO step) gives them an exactly
        zero gradient; in floats it is rounding noise, which Adam would scale into steps of the learning rate's
        size, different on every number of processes. PPO leaves them untrained."""
        return [self.head.bias, self.out_layer.fc2.bias]


class RewardModel(FusionTrunk):
    """R (and the critic V): the trunk's label vectors gathered into slots, + slot embedding, self-XiT, last slot.

    The original's "causal" XiT mask was a no-op; it would not change the last slot anyway, so attention is full.
    """

    def __init__(self, num_slots: int = 4, **sizes: Any):
        """`num_slots` rows of slot embedding (context pair + ranked pair); `sizes` as FusionScorer's."""
        super().__init__(**sizes)
        d = self.visual_feat_dim
        self.pos_emb = nn.Embedding(num_slots, d)
        self.xitt = XiT(d, self.xit_heads, self.feedforward_size, self.xit_dropout, self.compat_xit_attention)
        self.head = nn.Linear(d, 1)

    def forward(self, frames: Tensor, text: Tensor, slots: Tensor | None = None) -> Tensor:
        """One scalar per clip `[B]`. slots `[B, S]` are label positions in text's L axis: `[a, b, 1st, 2nd]` for
        the reward; None means every label in order (the critic's state `[0, 1]`)."""
        return self.score_slots(self.label_features(frames, text), slots)

    def score_slots(self, label_vectors: Tensor, slots: Tensor | None = None) -> Tensor:
        """label_vectors `[B, L, d]` from `label_features` → `[B]`; lets chosen and rejected share one trunk pass."""
        u = label_vectors
        if slots is not None:
            u = u.gather(1, slots.unsqueeze(-1).expand(-1, -1, u.shape[-1]))
        if u.shape[1] > self.pos_emb.num_embeddings:
            raise InputError(f"{u.shape[1]} slots but the reward model has {self.pos_emb.num_embeddings}")
        u = u + self.pos_emb.weight[: u.shape[1]]
        return self.head(self.xitt(u, u)[:, -1]).squeeze(-1)


class AlignmentModel(FusionScorer):
    """LETOR's alignment model (the original's `pointwise_2data_trad`): one input MLP per domain, `text_proj` for the
    target (MQ2008, 46 features) and `text_proj3` for the source (MSLR-WEB10K, 136), into the document-vector
    scorer. Trained on both domains' labels, its input MLPs then project every row into the scorer's space."""

    def __init__(self, target_feat_dim: int = 46, source_feat_dim: int = 136, **sizes: Any):
        super().__init__(**{**sizes, "inputs": "vectors"})
        self.target_feat_dim, self.source_feat_dim = target_feat_dim, source_feat_dim
        self.text_proj = Mlp(target_feat_dim, self.feedforward_size, self.visual_feat_dim)
        self.text_proj3 = Mlp(source_feat_dim, self.feedforward_size, self.visual_feat_dim)

    def project(self, rows: Tensor, from_source: Tensor | None = None) -> Tensor:
        """Raw rows `[B, L, 1, W]` (a target row in its first `target_feat_dim` columns, a source row in its first
        `source_feat_dim`; zero-padded to the batch's width) → vectors `[B, L, 1, d]`. `from_source` `[B]` marks
        the source-domain queries; None: all are the target's."""
        target = self.text_proj(rows[..., : self.target_feat_dim])
        if from_source is None:
            return target
        source = self.text_proj3(rows[..., : self.source_feat_dim])
        return torch.where(from_source.view(-1, 1, 1, 1), source, target)

    def forward(self, frames: Tensor, rows: Tensor, from_source: Tensor | None = None) -> Tensor:
        return super().forward(frames, self.project(rows, from_source))


def alignment_widths(state: Mapping[str, Tensor], source: str) -> dict[str, int]:
    """The raw feature widths an alignment state dict takes: `target_feat_dim` (`text_proj`) and
    `source_feat_dim` (`text_proj3`)."""
    widths = {}
    for name, key in (
        ("target_feat_dim", "text_proj.fc1.weight"),
        ("source_feat_dim", "text_proj3.fc1.weight"),
    ):
        if not isinstance(state.get(key), Tensor) or state[key].dim() != 2:
            raise InputError(
                f"{source}: not an alignment model (no {key}; expected the original's key names)"
            )
        widths[name] = int(state[key].shape[1])
    return widths


@dataclass(frozen=True)
class LabelRankingConfig:
    """The model sizes and switches; field names are the flag names (paper sizes by default). The fields in
    `RUN_SETTINGS` do not shape the weights or the scores: an explicit flag may change them for a loaded
    checkpoint of ours; the others come from its config."""

    seq_length: int = 196
    max_imgs: int = 16
    visual_feat_dim: int = 768
    text_feat_dim: int = 768
    feedforward_size: int = 3072
    xit_heads: int = 8
    xit_dropout: float = 0.1
    compat_xit_attention: bool = False
    scorer_head: ScorerHead = "flattened"
    inputs: Inputs = "clips"  # "vectors" for LETOR documents; set by --task, not a flag of its own

    @classmethod
    def from_config(cls, cfg: Any) -> LabelRankingConfig:
        """Read the fields from a Config / argparse namespace; settings it lacks keep the paper defaults.
        `--task letor` / `letor_align` builds the document-vector variants."""
        settings = settings_for(cls, cfg)
        settings["inputs"] = "vectors" if str(getattr(cfg, "task", "")).startswith("letor") else "clips"
        return cls(**settings)

    def build_scorer(self) -> FusionScorer:
        return FusionScorer(**asdict(self))

    def build_reward_model(self) -> RewardModel:
        return RewardModel(**asdict(self))

    def build_alignment_model(self, target_feat_dim: int, source_feat_dim: int) -> AlignmentModel:
        return AlignmentModel(target_feat_dim, source_feat_dim, **asdict(self))


RUN_SETTINGS = ("xit_dropout",)


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- released checkpoint layouts ---------------------------------------------------------------------------


def split_ppo_state(state: Mapping[str, Tensor], source: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A released PPO `.bin` (`actor.*` + `critic.*`) → (actor state, critic state) in our scorer/reward keys."""
    parts: dict[str, dict[str, Tensor]] = {"actor": {}, "critic": {}}
    stray = []
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix in parts and rest:
            parts[prefix][rest] = value
        else:
            stray.append(key)
    if stray:
        raise InputError(
            f"{source}: keys outside actor.* / critic.* in a PPO checkpoint: {', '.join(stray[:6])}"
        )
    empty = [name for name, part in parts.items() if not part]
    if empty:
        raise InputError(f"{source}: PPO checkpoint has no {' and no '.join(f'{n}.* keys' for n in empty)}")
    return parts["actor"], parts["critic"]


def join_ppo_state(
    actor_state: Mapping[str, Tensor], critic_state: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """(actor state, critic state) → the released PPO `.bin` layout (`actor.*` + `critic.*`)."""
    joined = {f"actor.{k}": v for k, v in actor_state.items()}
    joined.update({f"critic.{k}": v for k, v in critic_state.items()})
    return joined


# ---- Plackett–Luce over label scores (a stochastic ranking policy) --------------------------------------------


def _scaled(scores: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise InputError(f"the Plackett–Luce temperature must be > 0, got {temperature}")
    return scores / temperature


def plackett_luce_log_prob(scores: Tensor, order: Tensor, temperature: float = 1.0) -> Tensor:
    """log P(order) = Σᵢ [sᵢ − logsumexp_{j ≥ i} sⱼ] with s = scores/temperature taken in `order`.

    scores `[..., L]`; order `[..., L]` a permutation of label positions.
    """
    ordered = _scaled(scores, temperature).gather(-1, order)
    return (ordered - ordered.flip(-1).logcumsumexp(-1).flip(-1)).sum(-1)


@torch.no_grad()
def sample_plackett_luce(
    scores: Tensor, temperature: float = 1.0, generator: torch.Generator | RowStreams | None = None
) -> Tensor:
    """Orders `[..., L]` drawn from Plackett–Luce (Gumbel-top-k: argsort of s/τ + Gumbel noise). `generator`:
    one on scores' device, or one stream per row (`RowStreams`, on the CPU: a row's order does not depend on
    the other rows of its batch)."""
    logits = _scaled(scores, temperature)
    if isinstance(generator, RowStreams):
        uniform = generator.draw(torch.rand, tuple(logits.shape)).to(logits.device, logits.dtype)
    else:
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    tiny = torch.finfo(logits.dtype).tiny
    gumbel = -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 1e-7)))
    return torch.sort(logits + gumbel, dim=-1, descending=True, stable=True).indices


def plackett_luce_entropy(scores: Tensor, order: Tensor, temperature: float = 1.0) -> Tensor:
    """Σᵢ H(softmax over the labels not yet placed before step i of `order`)  `[...]`.

    By the chain rule its expectation over orders sampled from the model is the exact Plackett–Luce entropy
    (and for two labels it is exact for any order); differentiable in the scores. O(L²) memory per list.
    """
    logits = _scaled(scores, temperature).gather(-1, order)
    n = logits.shape[-1]
    later = torch.ones(n, n, dtype=torch.bool, device=logits.device).triu()  # row i: positions j ≥ i
    stage = logits.unsqueeze(-2).masked_fill(~later, float("-inf"))  # [..., step, L]
    open_ = torch.isfinite(stage)
    log_p = torch.where(
        open_, stage.log_softmax(-1), torch.zeros_like(stage)
    )  # no 0·(−inf) NaNs, even in grads
    return -torch.where(open_, log_p.exp() * log_p, torch.zeros_like(log_p)).sum((-1, -2))
