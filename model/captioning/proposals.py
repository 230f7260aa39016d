"""BMT's bimodal multi-headed proposal generator: the bimodal encoder over whole videos, one
1-D convolutional head per kernel size and modality, YOLO-style decoding of (centre, length, objectness) per
cell and anchor, and the original's losses.

Module and parameter names follow BMT's `MultimodalProposalGenerator` (`encoder.encoder_AV.layers.n.*`,
`detection_layers_A.i.conv_layers.{0,3,6}`, ...), so its released `best_prop_model.pt` loads strictly. Note the
stream order of BMT's encoder: M1 = audio, M2 = video (BMHRL's agent has M1 = video).

Whole videos come padded at the end (datasets/captioning/proposals.py: 300 video / 800 audio rows as the
original, or a longer video's own length) and the padded cells are decoded too: they propose segments like the
real ones (most are then clipped away by the duration). `decode` takes each video's own number of cells, so a
shorter video batched with a longer one keeps exactly the original's 300/800 cells and its results.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.blocks import LayerStack, PositionalEncoder
from model.captioning.bimodal_encoder import BiModalEncoderLayer
from utilities.distributed import loss_normaliser

MODALITIES = ("audio", "video")  # the original's flat order: every audio head, then every video head
STRIDES = {"audio": 0.96, "video": 64 / 25}  # seconds per feature row (cell), as datasets.features.STRIDE_S
KERNEL_SIZES = {
    "audio": (5, 13, 23, 35, 51, 69, 91, 121, 161, 211),
    "video": (1, 5, 9, 13, 19, 25, 35, 45, 61, 79),
}
ANCHORS_NUM = {"audio": 48, "video": 128}
MIN_PROPOSAL_S = 0.2  # proposals of this length or shorter (after clipping) are dropped


@dataclass(frozen=True)
class ProposalConfig:
    """Sizes of the generator (paper defaults: BMT's `train_prop` config)."""

    d_vid: int = 1024
    d_aud: int = 128
    d_model: int = 1024
    H: int = 4
    N: int = 2
    d_ff_vid: int = 4096
    d_ff_aud: int = 512
    dout_p: float = 0.1
    conv_layers_audio: tuple[int, ...] = (512, 512)  # hidden channels of the audio heads
    conv_layers_video: tuple[int, ...] = (512, 512)
    kernel_sizes_audio: tuple[int, ...] = KERNEL_SIZES["audio"]
    kernel_sizes_video: tuple[int, ...] = KERNEL_SIZES["video"]
    obj_coeff: float = 1.0
    noobj_coeff: float = 100.0
    anchors: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # seconds, ascending, per modality

    def kernel_sizes(self, modality: str) -> tuple[int, ...]:
        return self.kernel_sizes_audio if modality == "audio" else self.kernel_sizes_video

    def hidden(self, modality: str) -> tuple[int, ...]:
        return self.conv_layers_audio if modality == "audio" else self.conv_layers_video


class BMTBiModalEncoder(nn.Module):
    """BMT's encoder: N bimodal layers with M1 = audio, M2 = video, kept under `encoder_AV`."""

    def __init__(self, cfg: ProposalConfig):
        super().__init__()
        self.encoder_AV = LayerStack(
            lambda: BiModalEncoderLayer(
                cfg.d_aud, cfg.d_vid, cfg.d_model, cfg.d_ff_aud, cfg.d_ff_vid, cfg.dout_p, cfg.H
            ),
            cfg.N,
        )

    def forward(self, audio, video, audio_mask, video_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (Av, Va): audio attended by video, video attended by audio, for every row."""
        for layer in self.encoder_AV.layers:
            audio, video = layer(audio, video, audio_mask, video_mask)
        return audio, video


class ProposalHead(nn.Module):
    """`Conv1d(d→512, k, pad k//2) → Dropout → ReLU → Conv1d(512→512, 1) → Dropout → ReLU → Conv1d(512→3A, 1)`;
    output channel c is component c % 3 (centre, log-length, objectness) of anchor c // 3. As the original, a
    head built with dropout 0 has no Dropout modules (its convolutions are then `conv_layers.{0,2,4}`)."""

    def __init__(self, d_in: int, hidden: Sequence[int], kernel_size: int, n_anchors: int, dout_p: float):
        super().__init__()
        layers: list[nn.Module] = []
        widths = [d_in, *hidden]
        for i, (w_in, w_out) in enumerate(itertools.pairwise(widths)):
            k = kernel_size if i == 0 else 1
            layers.append(nn.Conv1d(w_in, w_out, k, padding=k // 2))
            layers += [nn.Dropout(dout_p), nn.ReLU()] if dout_p > 0 else [nn.ReLU()]  # the original's indices
        layers.append(nn.Conv1d(widths[-1], 3 * n_anchors, 1))
        self.conv_layers = nn.Sequential(*layers)
        self.n_anchors = n_anchors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` (B, S, d) → raw outputs (B, A, S, 3): anchor-major, as the original flattens them."""
        out = self.conv_layers(x.transpose(1, 2))
        B, _, S = out.shape
        return out.view(B, self.n_anchors, 3, S).transpose(2, 3)


@dataclass
class HeadOutput:
    """One head's raw outputs (B, A, S, 3) with the anchors (A,) and stride it decodes them with."""

    modality: str
    raw: torch.Tensor
    anchors: torch.Tensor
    stride: float


class ProposalGenerator(nn.Module):
    """Whole-video features → per-head raw outputs (`forward`); `decode` turns them into segments."""

    def __init__(self, cfg: ProposalConfig):
        super().__init__()
        for m in MODALITIES:
            if not cfg.anchors.get(m):
                raise ValueError(f"ProposalConfig has no {m} anchors")
        self.cfg = cfg
        self.pos_enc_A = PositionalEncoder(cfg.d_aud, cfg.dout_p)
        self.pos_enc_V = PositionalEncoder(cfg.d_vid, cfg.dout_p)
        self.encoder = BMTBiModalEncoder(cfg)
        self.detection_layers_A = self._heads("audio", cfg.d_aud)
        self.detection_layers_V = self._heads("video", cfg.d_vid)
        for m in MODALITIES:  # not in the state dict (the original keeps them next to it, in the checkpoint)
            self.register_buffer(f"anchors_{m}", torch.tensor(cfg.anchors[m], dtype=torch.float32), False)

    def _heads(self, modality: str, d_in: int) -> nn.ModuleList:
        n = len(self.cfg.anchors[modality])
        return nn.ModuleList(
            ProposalHead(d_in, self.cfg.hidden(modality), k, n, self.cfg.dout_p)
            for k in self.cfg.kernel_sizes(modality)
        )

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def forward(self, video, video_mask, audio, audio_mask) -> list[HeadOutput]:
        """`video` (B, Sv, d_vid), `audio` (B, Sa, d_aud), padded whole videos; masks (B, 1, S), True = real row
        (they mask attention keys only: padded rows are encoded and decoded too, as in the original)."""
        Av, Va = self.encoder(self.pos_enc_A(audio), self.pos_enc_V(video), audio_mask, video_mask)
        outputs = []
        for m, x, heads in (("audio", Av, self.detection_layers_A), ("video", Va, self.detection_layers_V)):
            anchors = getattr(self, f"anchors_{m}")
            outputs += [HeadOutput(m, head(x), anchors, STRIDES[m]) for head in heads]
        return outputs


def decode(outputs: Sequence[HeadOutput], n_cells: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, P, 3) proposals (start, end, score) of every head, cell and anchor, in the original's flat order
    (heads in order, anchor-major within a head): centre = (σ(t_c) + cell)·s, length = (anchor/s)·exp(t_l)·s.
    `n_cells[modality]` (B,): cells of each video to keep (its padded length); cells beyond get score −1, which
    `select_proposals` never keeps. None: every cell counts."""
    decoded = []
    for out in outputs:
        raw = out.raw.float()
        S = raw.shape[2]
        cell = torch.arange(S, device=raw.device, dtype=torch.float32)[None, None, :]
        centre = (torch.sigmoid(raw[..., 0]) + cell) * out.stride
        length = (out.anchors / out.stride)[None, :, None] * torch.exp(raw[..., 1]) * out.stride
        score = torch.sigmoid(raw[..., 2])
        if n_cells is not None:
            score = torch.where(cell < n_cells[out.modality][:, None, None], score, -1.0)
        decoded.append(torch.stack([centre - length / 2, centre + length / 2, score], -1).flatten(1, 2))
    return torch.cat(decoded, 1)


def select_proposals(
    proposals: torch.Tensor, duration: float, k: int, nms_tiou: float | None = None
) -> torch.Tensor:
    """One video's (P, 3) decoded proposals → at most `k` (start, end, score) rows by descending score, as BMT's
    single-video tool: start clipped to [0, D], end to ≤ D (D as float32), proposals of
    `MIN_PROPOSAL_S` or less dropped, the top k kept (ties in flat order), then the optional NMS."""
    D = torch.tensor(duration, dtype=torch.float32, device=proposals.device)
    start = torch.minimum(proposals[:, 0].clamp(min=0), D)
    end = torch.minimum(proposals[:, 1], D)
    score = proposals[:, 2]
    keep = (end - start > MIN_PROPOSAL_S) & (score >= 0)
    kept = torch.stack([start, end, score], 1)[keep]
    order = torch.sort(kept[:, 2], descending=True, stable=True).indices[:k]
    kept = kept[order]
    return kept if nms_tiou is None else nms(kept, nms_tiou)


def nms(proposals: torch.Tensor, tiou_thresh: float) -> torch.Tensor:
    """Greedy NMS over score-sorted (P, 3) rows: keep the first, drop every later row whose tIoU with it is ≥ the
    threshold, repeat on the rest."""
    keep: list[int] = []
    alive = torch.ones(len(proposals), dtype=torch.bool)
    for i in range(len(proposals)):
        if not alive[i]:
            continue
        keep.append(i)
        s, e = proposals[i, 0], proposals[i, 1]
        inter = (torch.minimum(e, proposals[:, 1]) - torch.maximum(s, proposals[:, 0])).clamp(min=0)
        union = torch.maximum(e, proposals[:, 1]) - torch.minimum(s, proposals[:, 0])
        alive &= ~(inter / union >= tiou_thresh)
    return proposals[keep]


@dataclass
class Targets:
    """One head's YOLO targets for a batch: which (video, anchor, cell) own a segment, and their values."""

    obj: torch.Tensor  # (B, A, S) bool
    centre: torch.Tensor  # (B, A, S) frac(centre / s) on owned cells
    log_length: torch.Tensor  # (B, A, S) log(length / anchor + 1e-16) on owned cells


def build_targets(
    segments: Sequence[Sequence[tuple[float, float]]], anchors: torch.Tensor, stride: float, n_cells: int
) -> Targets:
    """Each ground-truth (centre, length) goes to the anchor with the best length-IoU (min/max of the two
    lengths) and to cell floor(centre/s) clamped to the grid; a later segment that lands on the same cell and
    anchor replaces an earlier one."""
    B, A = len(segments), len(anchors)
    anchors_np = anchors.double().cpu().numpy()
    obj = np.zeros((B, A, n_cells), bool)
    centre = np.zeros((B, A, n_cells), np.float32)
    log_length = np.zeros((B, A, n_cells), np.float32)
    for b, video in enumerate(segments):
        for c, length in video:
            a = int(np.argmax(np.minimum(length, anchors_np) / np.maximum(length, anchors_np)))
            j = min(max(int(np.floor(c / stride)), 0), n_cells - 1)
            obj[b, a, j] = True
            centre[b, a, j] = c / stride - np.floor(c / stride)
            log_length[b, a, j] = np.log(length / anchors_np[a] + 1e-16)
    device = anchors.device
    return Targets(
        torch.from_numpy(obj).to(device),
        torch.from_numpy(centre).to(device),
        torch.from_numpy(log_length).to(device),
    )


def head_loss(
    raw: torch.Tensor,
    targets: Targets,
    obj_coeff: float,
    noobj_coeff: float,
    cells: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The original's YOLO loss of one head: MSE on σ(t_c) and on t_l over the owned cells, plus BCE objectness
    (mean over owned cells × obj_coeff, mean over every other cell × noobj_coeff). `cells`: what the sums over
    owned and other cells are divided by (default: their numbers in this batch, i.e. the means)."""
    raw = raw.float()
    obj = targets.obj
    n_obj, n_noobj = cells if cells is not None else (obj.sum(), (~obj).sum())
    loss_centre = F.mse_loss(torch.sigmoid(raw[..., 0])[obj], targets.centre[obj], reduction="sum")
    loss_length = F.mse_loss(raw[..., 1][obj], targets.log_length[obj], reduction="sum")
    logits = raw[..., 2]
    loss_obj = F.binary_cross_entropy_with_logits(logits[obj], torch.ones_like(logits[obj]), reduction="sum")
    loss_noobj = F.binary_cross_entropy_with_logits(
        logits[~obj], torch.zeros_like(logits[~obj]), reduction="sum"
    )
    return (loss_centre + loss_length + obj_coeff * loss_obj) / n_obj + noobj_coeff * loss_noobj / n_noobj


def proposal_loss(
    outputs: Sequence[HeadOutput], segments: Sequence[Sequence[tuple[float, float]]], cfg: ProposalConfig
) -> torch.Tensor:
    """Summed over heads and modalities; `segments[b]` are video b's ground-truth (centre, length) in seconds.
    Each head's means are over the cells of the global batch (`loss_normaliser`, one all-reduce for every
    head): under torchrun the averaged gradient is the one-process gradient."""
    targets: dict[tuple[str, int], Targets] = {}
    for out in outputs:
        key = (out.modality, out.raw.shape[2])
        if key not in targets:
            targets[key] = build_targets(segments, out.anchors, out.stride, out.raw.shape[2])
    heads = [targets[(out.modality, out.raw.shape[2])] for out in outputs]
    cells = loss_normaliser(torch.stack([torch.stack((t.obj.sum(), (~t.obj).sum())) for t in heads]))
    total = torch.zeros((), device=outputs[0].raw.device)
    for out, head_targets, head_cells in zip(outputs, heads, cells, strict=True):
        total = total + head_loss(out.raw, head_targets, cfg.obj_coeff, cfg.noobj_coeff, tuple(head_cells))
    return total


def kmeans_anchors(lengths: np.ndarray, k: int, iterations: int = 300) -> tuple[float, ...]:
    """1-D k-means (Lloyd) over segment lengths in seconds: the anchors. Lengths ≤ 0 are skipped, as in the
    original; unlike its single random start (sklearn, random_state 13), the start is deterministic: the
    (i + ½)/k quantiles of the distinct lengths, one per cluster region. Centres are returned ascending, as
    float32 values (the original's dtype). Fewer distinct lengths than k is an error."""
    x = np.asarray(lengths, np.float64)
    x = x[x > 0]
    distinct = np.unique(x)
    if len(distinct) < k:
        raise ValueError(f"{len(distinct)} distinct positive segment lengths cannot give {k} anchors")
    centres = distinct[((np.arange(k) + 0.5) * len(distinct) / k).astype(int)]
    for _ in range(iterations):
        # sorted centres: each point's nearest centre is found by the midpoints between neighbours
        owner = np.searchsorted((centres[:-1] + centres[1:]) / 2, x)
        sums = np.bincount(owner, weights=x, minlength=k)
        counts = np.bincount(owner, minlength=k)
        updated = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centres))
        if np.array_equal(updated, centres):
            break
        centres = updated
    return tuple(float(c) for c in np.float32(centres))
