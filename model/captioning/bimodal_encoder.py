"""BMT's bimodal encoder: video and audio streams that attend to themselves, then to each other (plus the
single-stream encoder of the unimodal AHRL/VHRL ablations)."""

from __future__ import annotations

import torch
from torch import nn

from model.blocks import LayerStack, MultiheadedAttention, PositionwiseFeedForward, ResidualConnection


class BiModalEncoderLayer(nn.Module):
    """Self-attention in each stream; cross-attention of each stream (normed) on the other's un-normed,
    self-attended values; a feed-forward per stream. M1 = video, M2 = audio (the BMHRL order)."""

    def __init__(self, d_M1: int, d_M2: int, d_model: int, d_ff_M1: int, d_ff_M2: int, dout_p: float, H: int):
        super().__init__()
        self.self_att_M1 = MultiheadedAttention(d_M1, d_M1, d_M1, H, dout_p, d_model)
        self.self_att_M2 = MultiheadedAttention(d_M2, d_M2, d_M2, H, dout_p, d_model)
        self.bi_modal_att_M1 = MultiheadedAttention(d_M1, d_M2, d_M2, H, dout_p, d_model)
        self.bi_modal_att_M2 = MultiheadedAttention(d_M2, d_M1, d_M1, H, dout_p, d_model)
        self.feed_forward_M1 = PositionwiseFeedForward(d_M1, d_ff_M1, dout_p)
        self.feed_forward_M2 = PositionwiseFeedForward(d_M2, d_ff_M2, dout_p)
        self.res_layers_M1 = nn.ModuleList(ResidualConnection(d_M1, dout_p) for _ in range(3))
        self.res_layers_M2 = nn.ModuleList(ResidualConnection(d_M2, dout_p) for _ in range(3))

    def forward(
        self, M1: torch.Tensor, M2: torch.Tensor, mask_M1: torch.Tensor, mask_M2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        M1 = self.res_layers_M1[0](M1, lambda x: self.self_att_M1(x, x, x, mask_M1))
        M2 = self.res_layers_M2[0](M2, lambda x: self.self_att_M2(x, x, x, mask_M2))
        M1_from_M2 = self.res_layers_M1[1](M1, lambda x: self.bi_modal_att_M1(x, M2, M2, mask_M2))
        M2_from_M1 = self.res_layers_M2[1](M2, lambda x: self.bi_modal_att_M2(x, M1, M1, mask_M1))
        M1 = self.res_layers_M1[2](M1_from_M2, self.feed_forward_M1)
        M2 = self.res_layers_M2[2](M2_from_M1, self.feed_forward_M2)
        return M1, M2


class BiModalEncoder(nn.Module):
    """N bimodal layers, no final norm. Returns (Va, Av): video attended by audio, audio attended by video."""

    def __init__(
        self,
        d_vid: int,
        d_aud: int,
        d_model: int,
        d_ff_vid: int,
        d_ff_aud: int,
        dout_p: float,
        H: int,
        N: int,
    ):
        super().__init__()
        self.encoder = LayerStack(
            lambda: BiModalEncoderLayer(d_vid, d_aud, d_model, d_ff_vid, d_ff_aud, dout_p, H), N
        )

    def forward(
        self, video: torch.Tensor, audio: torch.Tensor, video_mask: torch.Tensor, audio_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`video_mask` (B, 1, Sv) and `audio_mask` (B, 1, Sa), True = a real feature row."""
        for layer in self.encoder.layers:
            video, audio = layer(video, audio, video_mask, audio_mask)
        return video, audio


class UniModalEncoderLayer(nn.Module):
    """Self-attention and feed-forward on one stream (the AHRL/VHRL ablations)."""

    def __init__(self, d: int, d_model: int, d_ff: int, dout_p: float, H: int):
        super().__init__()
        self.self_att = MultiheadedAttention(d, d, d, H, dout_p, d_model)
        self.feed_forward = PositionwiseFeedForward(d, d_ff, dout_p)
        self.res_layers = nn.ModuleList(ResidualConnection(d, dout_p) for _ in range(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.res_layers[0](x, lambda y: self.self_att(y, y, y, mask))
        return self.res_layers[1](x, self.feed_forward)


class UniModalEncoder(nn.Module):
    def __init__(self, d: int, d_model: int, d_ff: int, dout_p: float, H: int, N: int):
        super().__init__()
        self.encoder = LayerStack(lambda: UniModalEncoderLayer(d, d_model, d_ff, dout_p, H), N)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return x
