"""Transformer blocks shared by the BMHRL agent (the original BMT/BMHRL `blocks.py` and `multihead_attention.py`).

Attribute names follow the original so that state dicts are interchangeable with its checkpoints
(`linear_Q2d`, `res_layers_M1.0.norm`, `embedder.weight`, ...). Masks are boolean, True = "may be attended to".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from utilities.errors import InputError

KeyValue = tuple[torch.Tensor, torch.Tensor]  # projected keys and values, (B, H, S, d_k) each


class MultiheadedAttention(nn.Module):
    """Q, K and V projected to `d_model`, split into `H` heads, scaled dot-product attention, heads concatenated
    and projected back to the query width `d_model_Q`. As in the original, dropout is applied to the attention
    *output* of each head (not to the attention weights)."""

    def __init__(self, d_model_Q: int, d_model_K: int, d_model_V: int, H: int, dout_p: float, d_model: int):
        super().__init__()
        if d_model % H:
            raise ValueError(f"d_model {d_model} is not divisible by the number of heads {H}")
        self.H = H
        self.linear_Q2d = nn.Linear(d_model_Q, d_model)
        self.linear_K2d = nn.Linear(d_model_K, d_model)
        self.linear_V2d = nn.Linear(d_model_V, d_model)
        self.linear_d2Q = nn.Linear(d_model, d_model_Q)
        self.dropout = nn.Dropout(dout_p)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        return x.view(B, S, self.H, -1).transpose(1, 2)

    def project_kv(self, K: torch.Tensor, V: torch.Tensor) -> KeyValue:
        """Keys and values projected and split into heads; decoding caches these. The key projection's bias is
        left out: it adds the same q·b to every score of a query, which the softmax cancels, so it has no effect
        on any output. Computed, it got a gradient of pure rounding noise that Adam turned into a random walk of
        up to ±lr per step (and that differs between 1 and N processes); left out, it gets none and stays as
        initialised or loaded (kept in the state dict for the checkpoint layout)."""
        return self._heads(F.linear(K, self.linear_K2d.weight)), self._heads(self.linear_V2d(V))

    def attend(self, Q: torch.Tensor, kv: KeyValue, mask: torch.Tensor | None) -> torch.Tensor:
        """`Q` (B, Sq, dQ) against projected `kv`; `mask` (B, 1 or Sq, Sk) bool or None."""
        B, Sq, _ = Q.shape
        q = self._heads(self.linear_Q2d(Q))
        out = F.scaled_dot_product_attention(q, *kv, attn_mask=None if mask is None else mask[:, None])
        out = self.dropout(out).transpose(1, 2).reshape(B, Sq, -1)
        return self.linear_d2Q(out)

    def forward(
        self, Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return self.attend(Q, self.project_kv(K, V), mask)


class ResidualConnection(nn.Module):
    """Pre-LN residual: `x + Dropout(sublayer(LayerNorm(x)))`. The sublayer receives the normed input."""

    def __init__(self, size: int, dout_p: float):
        super().__init__()
        self.norm = nn.LayerNorm(size)
        self.dropout = nn.Dropout(dout_p)

    def forward(self, x: torch.Tensor, sublayer) -> torch.Tensor:
        return x + self.dropout(sublayer(self.norm(x)))


class PositionwiseFeedForward(nn.Module):
    """`fc2(Dropout(ReLU(fc1(x))))`."""

    def __init__(self, d_model: int, d_ff: int, dout_p: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


def positional_table(max_len: int, d: int) -> torch.Tensor:
    """The original's table, built in float64: even dim i gets sin(pos / 10000^(i/d)), odd dim i gets
    cos(pos / 10000^(i/d)) (the odd exponent is i/d, not (i-1)/d: part of the published model)."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    i = torch.arange(d, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, i / d)
    return torch.where(i.long() % 2 == 0, torch.sin(angle), torch.cos(angle))


class PositionalEncoder(nn.Module):
    """Adds the positional table (a non-persistent buffer: never in a state dict), then dropout."""

    def __init__(self, d_model: int, dout_p: float, max_len: int = 3660):
        super().__init__()
        self.register_buffer("table", positional_table(max_len, d_model).float(), persistent=False)
        self.dropout = nn.Dropout(dout_p)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """`x` (B, S, d) holds positions start .. start+S-1 (decoding passes the step as `start`)."""
        end = start + x.shape[1]
        if end > len(self.table):
            raise InputError(
                f"sequence of {end} positions is longer than the positional table ({len(self.table)})"
            )
        return self.dropout(x + self.table[start:end].to(x.dtype))


class VocabularyEmbedder(nn.Module):
    """Token ids → word vectors × √d (the original's GloVe embedder); frozen unless `trainable`."""

    def __init__(self, weights: torch.Tensor, trainable: bool = False):
        super().__init__()
        self.embedder = nn.Embedding.from_pretrained(weights, freeze=not trainable)
        self.scale = math.sqrt(weights.shape[1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedder(ids) * self.scale


class LayerStack(nn.Module):
    """N independent copies of a layer, kept under `layers` as in the original."""

    def __init__(self, make_layer, N: int):
        super().__init__()
        self.layers = nn.ModuleList(make_layer() for _ in range(N))


def causal_mask(pad_mask: torch.Tensor) -> torch.Tensor:
    """(B, L, L) bool: position t may attend to positions ≤ t that are not padding (`pad_mask` True = token)."""
    L = pad_mask.shape[1]
    subsequent = torch.ones(L, L, dtype=torch.bool, device=pad_mask.device).tril()
    return pad_mask[:, None, :] & subsequent[None]
