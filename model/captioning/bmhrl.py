"""The BMHRL agent: BMT's bimodal encoder, worker and manager fusion stacks with a learned audio/video gate,
a manager that emits sub-goals, a worker that turns (fused caption features, current goal) into word
log-probabilities, a frozen segment critic that says where a sub-goal ends, and the two value functions.

Attribute names follow the original so that `state_dict()` keys equal its checkpoints' keys, minus the
fusion feed-forward layers that the original creates but never applies (they are not created here). The ablations:
`AHRL` (audio only), `VHRL` (video only) and `BM` (bimodal, no hierarchy: the fused decoder and a plain output layer).

Two ways to run the decoder side, with the same numbers:
- `forward` / `decode`: teacher-forced over a whole caption prefix (training, and the original's decoding);
- `start_decoding` + `step`: one token at a time with cached keys/values, critic recurrent state and held goal.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.blocks import (
    KeyValue,
    LayerStack,
    MultiheadedAttention,
    PositionalEncoder,
    PositionwiseFeedForward,
    ResidualConnection,
    VocabularyEmbedder,
    causal_mask,
)
from model.captioning.bimodal_encoder import BiModalEncoder, UniModalEncoder
from utilities.checkpoint import load_model_state
from utilities.config import settings_for
from utilities.errors import InputError
from utilities.seeding import RowStreams, normal

MODALITIES = {"BMHRL": ("audio", "video"), "AHRL": ("audio",), "VHRL": ("video",), "BM": ("audio", "video")}

# Clause-joining words before which the heuristic segmenter puts a sub-goal boundary.
JOINING_WORDS = frozenset(
    ("and", "then", "while", "as", "before", "after", "but", "when", "until", "once", "so", "because", "or")
)

# When a new goal is taken relative to a segment end (README, "The goal lag"): 'original' at the position after
# the segment-ending input, so the first word of the next clause is still generated under the old goal; 'aligned'
# at the segment-ending input itself, so that word is generated under the new goal.
GOAL_TIMINGS = ("original", "aligned")

# The original's fusion feed-forward layers, created but never applied: dropped when its checkpoints are loaded.
DEAD_KEY = re.compile(r"^bm_(worker|manager)_fus\.decoder\.layers\.\d+\.feed_forward\.")


@dataclass(frozen=True)
class AgentConfig:
    """The agent's sizes, named after the original's flags; defaults are the paper's (52.1M → 43.5M + 365·|V|).

    `mode`: BMHRL, AHRL (audio only), VHRL (video only), BM (no hierarchy). `segmenter`: 'critic' (the frozen
    pretrained segment critic) or 'heuristic' (`HeuristicSegmenter`, no weights). `rl_goal_att_heads` is the
    worker's goal-attention head count (hard-coded 2 in the original). The fields in `RUN_SETTINGS` are not
    sizes: a loaded checkpoint folder takes them from the flags given explicitly. `goal_timing` (not a size):
    when a new goal is taken after a segment end (`GOAL_TIMINGS`)."""

    mode: str = "BMHRL"
    d_vid: int = 1024
    d_aud: int = 128
    d_model_caps: int = 300
    d_model: int = 1024
    rl_att_heads: int = 4
    rl_att_layers: int = 2
    rl_ff_v: int = 1024
    rl_ff_a: int = 512
    rl_goal_d: int = 64
    rl_goal_att_heads: int = 2
    dout_p: float = 0.1
    segmenter: str = "critic"
    rl_critic_score_threshhold: float = 0.25
    unfreeze_word_emb: bool = False
    goal_timing: str = "original"

    def __post_init__(self):
        if self.mode not in MODALITIES:
            raise InputError(f"--mode {self.mode!r}: the agent is one of {', '.join(MODALITIES)}")
        if self.segmenter not in ("critic", "heuristic"):
            raise InputError(f"--segmenter {self.segmenter!r}: expected 'critic' or 'heuristic'")
        if self.goal_timing not in GOAL_TIMINGS:
            raise InputError(f"--goal_timing {self.goal_timing!r}: expected one of {', '.join(GOAL_TIMINGS)}")

    @classmethod
    def from_config(cls, cfg) -> AgentConfig:
        """From the parsed run Config (flag names = field names). A `--mode` that is not an architecture
        (e.g. 'eval') means the full BMHRL agent."""
        values = settings_for(cls, cfg)
        if values.get("mode") not in MODALITIES:
            values["mode"] = "BMHRL"
        return cls(**values)


# AgentConfig fields that do not shape the weights: loading a checkpoint folder keeps its sizes (and mode) but
# lets these be changed with an explicit flag (epoch_loops/captioning/agent_files.py).
RUN_SETTINGS = ("dout_p", "segmenter", "rl_critic_score_threshhold", "unfreeze_word_emb", "goal_timing")


@dataclass
class Memory:
    """The encoder's output: video attended by audio (B, Sv, d_vid), audio attended by video (B, Sa, d_aud) and
    their masks (B, 1, S), True = a real feature row. A unimodal agent leaves the other modality None."""

    video: torch.Tensor | None
    audio: torch.Tensor | None
    video_mask: torch.Tensor | None
    audio_mask: torch.Tensor | None

    def repeat_interleave(self, n: int) -> Memory:
        """Each row n times in a row (beams, samples per segment)."""
        return Memory(*(None if t is None else t.repeat_interleave(n, dim=0) for t in self._tensors()))

    def _tensors(self):
        return self.video, self.audio, self.video_mask, self.audio_mask


@dataclass
class AgentOutput:
    """Teacher-forced outputs, (B, L, ...) at every decoder input position. The hierarchical fields are None
    for the BM ablation."""

    log_probs: torch.Tensor  # (B, L, V)
    worker_feat: torch.Tensor  # (B, L, d_caps)
    manager_feat: torch.Tensor | None  # (B, L, d_caps)
    goals: torch.Tensor | None  # (B, L, goal_d), each held from its goal start to the next (--goal_timing)
    goal_starts: torch.Tensor | None  # (B, L) bool: a new goal is taken at this position


class KVCache:
    """The projected keys/values of the positions decoded so far, for one attention layer."""

    def __init__(self):
        self.kv: KeyValue | None = None

    def extend(self, kv: KeyValue) -> KeyValue:
        if self.kv is not None:
            kv = (torch.cat((self.kv[0], kv[0]), 2), torch.cat((self.kv[1], kv[1]), 2))
        self.kv = kv
        return kv

    def reorder(self, index: torch.Tensor) -> None:
        self.kv = (self.kv[0].index_select(0, index), self.kv[1].index_select(0, index))


def _attend_cached(att: MultiheadedAttention, x: torch.Tensor, mask, cache: KVCache | None) -> torch.Tensor:
    """Self-attention of `x`; with a cache, `x` is the newest position and attends to every cached one."""
    kv = att.project_kv(x, x)
    if cache is not None:
        kv = cache.extend(kv)
    return att.attend(x, kv, mask)


class FusionLayer(nn.Module):
    """Caption self-attention, then attention on each modality (query normed, memory un-normed), each result
    re-normed and the two mixed by a learned gate λ = sigmoid(clamp(α, −2, 2)): C = λ·Cv + (1 − λ)·Ca.
    With one modality there is no gate and no re-norm: C = C + att(LN(C), M)."""

    def __init__(
        self,
        modalities: Sequence[str],
        d_caps: int,
        d_aud: int,
        d_vid: int,
        d_model: int,
        dout_p: float,
        H: int,
    ):
        super().__init__()
        self.modalities = tuple(modalities)
        self.self_att = MultiheadedAttention(d_caps, d_caps, d_caps, H, dout_p, d_model)
        self.res_layer_self_att = ResidualConnection(d_caps, dout_p)
        if "audio" in self.modalities:
            self.enc_att_A = MultiheadedAttention(d_caps, d_aud, d_aud, H, dout_p, d_model)
            self.res_layer_enc_att_A = ResidualConnection(d_caps, dout_p)
        if "video" in self.modalities:
            self.enc_att_V = MultiheadedAttention(d_caps, d_vid, d_vid, H, dout_p, d_model)
            self.res_layer_enc_att_V = ResidualConnection(d_caps, dout_p)
        if len(self.modalities) == 2:
            self.normCA = nn.LayerNorm(d_caps)
            self.normCV = nn.LayerNorm(d_caps)
            self.a_v_constant = nn.Parameter(torch.zeros(1))

    def memory_kv(self, memory: Memory) -> dict[str, KeyValue]:
        kv = {}
        if "audio" in self.modalities:
            kv["audio"] = self.enc_att_A.project_kv(memory.audio, memory.audio)
        if "video" in self.modalities:
            kv["video"] = self.enc_att_V.project_kv(memory.video, memory.video)
        return kv

    def forward(self, C, memory_kv, memory: Memory, C_mask, cache: KVCache | None = None) -> torch.Tensor:
        C = self.res_layer_self_att(C, lambda x: _attend_cached(self.self_att, x, C_mask, cache))
        if "audio" in self.modalities:
            Ca = self.res_layer_enc_att_A(
                C, lambda x: self.enc_att_A.attend(x, memory_kv["audio"], memory.audio_mask)
            )
        if "video" in self.modalities:
            Cv = self.res_layer_enc_att_V(
                C, lambda x: self.enc_att_V.attend(x, memory_kv["video"], memory.video_mask)
            )
        if len(self.modalities) == 1:
            return Ca if "audio" in self.modalities else Cv
        gate = torch.sigmoid(self.a_v_constant.clamp(-2, 2))
        return gate * self.normCV(Cv) + (1 - gate) * self.normCA(Ca)


class Fusion(nn.Module):
    """N fusion layers (`decoder.layers` as in the original)."""

    def __init__(self, N: int, **layer_args):
        super().__init__()
        self.decoder = LayerStack(lambda: FusionLayer(**layer_args), N)

    def memory_kv(self, memory: Memory) -> list[dict[str, KeyValue]]:
        return [layer.memory_kv(memory) for layer in self.decoder.layers]

    def forward(self, C, memory_kv, memory: Memory, C_mask, caches: Sequence[KVCache] | None = None):
        for i, layer in enumerate(self.decoder.layers):
            C = layer(C, memory_kv[i], memory, C_mask, None if caches is None else caches[i])
        return C


class Manager(nn.Module):
    """Sub-goals from the manager's fused features: `linear(Dropout(features))`."""

    def __init__(self, d_caps: int, goal_d: int, dout_p: float):
        super().__init__()
        self.dropout = nn.Dropout(dout_p)
        self.linear = nn.Linear(d_caps, goal_d)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(features))


class Worker(nn.Module):
    """The held goal attends over the worker's fused features (causal); word log-probs from
    `projection([features ; attended])`."""

    def __init__(self, d_caps: int, goal_d: int, vocab_size: int, H: int, dout_p: float, d_model: int):
        super().__init__()
        self.goal_attention = MultiheadedAttention(goal_d, d_caps, d_caps, H, dout_p, d_model)
        self.projection = nn.Linear(d_caps + goal_d, vocab_size)

    def forward(self, features, goals, mask, cache: KVCache | None = None) -> torch.Tensor:
        kv = self.goal_attention.project_kv(features, features)
        if cache is not None:
            kv = cache.extend(kv)
        attended = self.goal_attention.attend(goals, kv, mask)
        return F.log_softmax(self.projection(torch.cat((features, attended), -1)), dim=-1)


def expand_goals(goals: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Hold each goal until the next start: position t gets goals[s] for the latest s ≤ t with starts[s]
    (`starts[:, 0]` must be True). Gradient reaches only the positions where a goal is taken."""
    L = starts.shape[1]
    taken_at = torch.where(starts, torch.arange(L, device=starts.device), 0).cummax(dim=1).values
    return goals.gather(1, taken_at[..., None].expand(-1, -1, goals.shape[-1]))


class AReLU(nn.Module):
    """relu(x)·(1 + sigmoid(β)) − relu(−x)·clamp(α, 0.01, 0.99), learned scalars α=0.9, β=2.0."""

    def __init__(self, alpha: float = 0.9, beta: float = 2.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([alpha]))
        self.beta = nn.Parameter(torch.tensor([beta]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) * (1 + torch.sigmoid(self.beta)) - F.relu(-x) * self.alpha.clamp(0.01, 0.99)


@dataclass
class SegmenterState:
    """A segmenter's incremental state: recurrent states (critic) and whether the previous token ended a
    segment (critic) or was punctuation (heuristic)."""

    recurrent: tuple[torch.Tensor, ...]  # (layers, B, H) each
    previous: torch.Tensor  # (B,) bool

    def reorder(self, index: torch.Tensor) -> None:
        self.recurrent = tuple(h.index_select(1, index) for h in self.recurrent)
        self.previous = self.previous.index_select(0, index)


class SegmentCritic(nn.Module):
    """The original's segment critic: LSTM(d→2d, 4 layers) → AReLU → GRU(2d→2d, 2 layers) → AReLU →
    Linear(2d→1) on the word embeddings (before positional encoding). A token ends a segment when
    sigmoid(logit) > `threshold`. Causal (recurrent), so `step` gives the same labels one token at a time. The
    agent keeps it frozen; `logits` has gradients for training the critic itself."""

    SIZE_KEYS = (("d_model_caps", "lstm.weight_ih_l0", 1),)  # a critic.cp at other sizes names its flag

    def __init__(self, d_caps: int = 300, threshold: float = 0.25, lstm_layers: int = 4, gru_layers: int = 2):
        super().__init__()
        self.threshold = threshold
        self.lstm = nn.LSTM(d_caps, 2 * d_caps, num_layers=lstm_layers, batch_first=True)
        self.gru = nn.GRU(2 * d_caps, 2 * d_caps, num_layers=gru_layers, batch_first=True)
        self.lin = nn.Linear(2 * d_caps, 1)
        self.relu = AReLU()
        self.relu2 = AReLU()

    def logits(self, embedded: torch.Tensor, recurrent: tuple[torch.Tensor, ...] | None = None):
        """(B, L) logits and the recurrent state (h, c of the LSTM, h of the GRU) after the last position."""
        lstm_state = None if recurrent is None else recurrent[:2]
        h1, (h, c) = self.lstm(embedded, lstm_state)
        h2, g = self.gru(self.relu(h1), None if recurrent is None else recurrent[2])
        return self.lin(self.relu2(h2)).squeeze(-1), (h, c, g)

    @torch.no_grad()
    def segment_ends(self, ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the token at each position ends a segment (any batch size, B = 1 included)."""
        return torch.sigmoid(self.logits(embedded)[0]) > self.threshold

    def goal_starts(self, ids: torch.Tensor, embedded: torch.Tensor, timing: str) -> torch.Tensor:
        """(B, L) bool: a new goal is taken at this position (the agent adds position 0): 'original' after a
        segment-ending input, 'aligned' at it."""
        ends = self.segment_ends(ids, embedded)
        return ends if timing == "aligned" else F.pad(ends[:, :-1], (1, 0), value=False)

    def start(self, batch_size: int, device) -> SegmenterState:
        zeros = torch.zeros(batch_size, dtype=torch.bool, device=device)
        h = torch.zeros(self.lstm.num_layers, batch_size, self.lstm.hidden_size, device=device)
        g = torch.zeros(self.gru.num_layers, batch_size, self.gru.hidden_size, device=device)
        return SegmenterState((h, h.clone(), g), zeros)

    @torch.no_grad()
    def step(
        self, ids_t: torch.Tensor, embedded_t: torch.Tensor, state: SegmenterState, timing: str
    ) -> torch.Tensor:
        """`goal_starts` at this position, given its token (B,) and embedding (B, 1, d); advances `state`."""
        logit, state.recurrent = self.logits(embedded_t, state.recurrent)
        ended_before, state.previous = state.previous, torch.sigmoid(logit[:, 0]) > self.threshold
        return state.previous if timing == "aligned" else ended_before


class HeuristicSegmenter(nn.Module):
    """A rule in place of the trained critic (no weights, so training works without the released critic.cp).

    A token ends a segment when it is punctuation (every character in `string.punctuation`: ".", ",", ";", ...)
    or when the *next* token is a clause-joining word (`JOINING_WORDS`: "and", "then", "while", "as", "before",
    "after", "but", "when", "until", "once", "so", "because", "or"). "a man walks in , and then sits down ." ends
    segments at ",", "and" and ".", so new goals start at "and" and "then" (a goal is taken at the token after a
    segment end, as with the critic). Works on token ids through the vocabulary's `itos`; special tokens
    never end a segment.

    Under `--goal_timing aligned` a goal is taken as soon as the boundary is known while decoding: at a
    punctuation input (its next word gets the new goal), and at a joining word that does not follow punctuation
    (a boundary *before* a joining word is known only once the word is there, so the word itself is still
    generated under the old goal, as under 'original')."""

    def __init__(self, itos: Sequence[str], special_ids: Sequence[int]):
        super().__init__()
        words = [token.strip().lower() for token in itos]
        punctuation = torch.tensor([bool(w) and all(ch in string.punctuation for ch in w) for w in words])
        joining = torch.tensor([w in JOINING_WORDS for w in words])
        punctuation[list(special_ids)] = False
        joining[list(special_ids)] = False
        self.register_buffer("is_punctuation", punctuation, persistent=False)
        self.register_buffer("is_joining", joining, persistent=False)

    def segment_ends(self, ids: torch.Tensor, embedded: torch.Tensor | None = None) -> torch.Tensor:
        next_joins = F.pad(self.is_joining[ids[:, 1:]], (0, 1), value=False)
        return self.is_punctuation[ids] | next_joins

    def goal_starts(self, ids: torch.Tensor, embedded: torch.Tensor | None, timing: str) -> torch.Tensor:
        """As `SegmentCritic.goal_starts`, from the rule (see the class docstring for 'aligned')."""
        after_punctuation = F.pad(self.is_punctuation[ids[:, :-1]], (1, 0), value=False)
        return self._starts(self.is_punctuation[ids], self.is_joining[ids], after_punctuation, timing)

    def start(self, batch_size: int, device) -> SegmenterState:
        return SegmenterState((), torch.zeros(batch_size, dtype=torch.bool, device=device))

    def step(
        self, ids_t: torch.Tensor, embedded_t: torch.Tensor, state: SegmenterState, timing: str
    ) -> torch.Tensor:
        punctuation = self.is_punctuation[ids_t]
        starts = self._starts(punctuation, self.is_joining[ids_t], state.previous, timing)
        state.previous = punctuation
        return starts

    @staticmethod
    def _starts(
        punctuation: torch.Tensor, joining: torch.Tensor, after_punctuation: torch.Tensor, timing: str
    ) -> torch.Tensor:
        if timing == "aligned":
            return punctuation | (joining & ~after_punctuation)
        return after_punctuation | joining


@dataclass
class DecodeState:
    """Everything `BMHRLAgent.step` carries from one position to the next."""

    memory: Memory
    memory_kv: dict[str, list]  # per fusion stack, per layer: projected memory keys/values
    caches: dict[str, list[KVCache]]  # per fusion stack (and "worker"): self-attention caches
    segmenter: SegmenterState | None
    goal: torch.Tensor | None  # (B, goal_d), the goal held at the previous position
    explore: bool
    token_mask: torch.Tensor | None = None  # (B, t) bool: the prefix's tokens that are not padding
    t: int = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (beam search). Memory rows are identical within a segment's beams: not reordered."""
        for caches in self.caches.values():
            for cache in caches:
                cache.reorder(index)
        if self.segmenter is not None:
            self.segmenter.reorder(index)
        if self.goal is not None:
            self.goal = self.goal.index_select(0, index)
        self.token_mask = self.token_mask.index_select(0, index)


@dataclass
class StepOutput:
    log_probs: torch.Tensor  # (B, V) for the next token
    goal_start: torch.Tensor | None  # (B,) bool: a new goal was taken at this position
    goal_log_prob: torch.Tensor | None  # (B,) log-density of the explored goal taken here (0 where none)
    worker_feat: torch.Tensor  # (B, d_caps) the worker's fused features here (value-function input)
    manager_feat: torch.Tensor | None  # (B, d_caps)
    goal: torch.Tensor | None  # (B, goal_d) the goal held here


class BMHRLAgent(nn.Module):
    """The agent. Features: video (B, Sv, d_vid), audio (B, Sa, d_aud) with (B, S) bool masks (True = real row,
    None = all real). Captions: token ids (B, L) starting with the start token, padded with `pad_idx`.

    The manager explores (Gaussian noise on each goal, drawn from `self.rng`) when `exploration` is on, which
    `set_phase("manager")` does, and only in training mode; decoding for validation never explores."""

    # The keys whose shapes give the size flags (utilities.checkpoint.SizeKey), so that a checkpoint of other
    # sizes is reported as the flags that would fit. The heads (--rl_att_heads) leave no trace in the shapes.
    SIZE_KEYS = (
        ("d_model_caps", "emb_C.embedder.weight", 1),
        ("d_model", "bm_worker_fus.decoder.layers.0.self_att.linear_Q2d.weight", 0),
        ("d_vid", "bm_worker_fus.decoder.layers.0.enc_att_V.linear_K2d.weight", 1),
        ("d_aud", "bm_worker_fus.decoder.layers.0.enc_att_A.linear_K2d.weight", 1),
        ("rl_ff_v", "bm_enc.encoder.layers.0.feed_forward_M1.fc1.weight", 0),
        ("rl_ff_v", "v_enc.encoder.layers.0.feed_forward.fc1.weight", 0),
        ("rl_ff_a", "bm_enc.encoder.layers.0.feed_forward_M2.fc1.weight", 0),
        ("rl_ff_a", "a_enc.encoder.layers.0.feed_forward.fc1.weight", 0),
        ("rl_goal_d", "manager.linear.weight", 0),
        ("rl_att_layers", "bm_worker_fus.decoder.layers.{}.self_att.linear_Q2d.weight", None),
    )

    def __init__(
        self,
        vocab_size: int,
        cfg: AgentConfig = AgentConfig(),
        word_vectors: torch.Tensor | None = None,
        itos: Sequence[str] | None = None,
        pad_idx: int = 1,
        start_idx: int = 2,
        end_idx: int = 3,
    ):
        super().__init__()
        self.cfg = cfg
        self.vocab_size, self.pad_idx, self.start_idx, self.end_idx = vocab_size, pad_idx, start_idx, end_idx
        self.modalities = MODALITIES[cfg.mode]
        self.hierarchical = cfg.mode != "BM"
        d_caps, H, N, dout = cfg.d_model_caps, cfg.rl_att_heads, cfg.rl_att_layers, cfg.dout_p
        if word_vectors is None:
            word_vectors = torch.zeros(vocab_size, d_caps)
        if tuple(word_vectors.shape) != (vocab_size, d_caps):
            raise InputError(
                f"word vectors are {tuple(word_vectors.shape)}, expected ({vocab_size}, {d_caps})"
            )

        if self.hierarchical:
            if cfg.segmenter == "critic":
                self.critic = SegmentCritic(d_caps, cfg.rl_critic_score_threshhold).requires_grad_(False)
            else:
                if itos is None or len(itos) != vocab_size:
                    raise InputError(
                        "the heuristic segmenter needs the vocabulary (itos) of the agent's size"
                    )
                self.critic = HeuristicSegmenter(itos, (pad_idx, start_idx, end_idx))
        self.emb_C = VocabularyEmbedder(word_vectors, trainable=cfg.unfreeze_word_emb)
        self.pos_enc_C = PositionalEncoder(d_caps, dout)
        if "video" in self.modalities:
            self.pos_enc_V = PositionalEncoder(cfg.d_vid, dout)
        if "audio" in self.modalities:
            self.pos_enc_A = PositionalEncoder(cfg.d_aud, dout)
        if len(self.modalities) == 2:
            self.bm_enc = BiModalEncoder(
                cfg.d_vid, cfg.d_aud, cfg.d_model, cfg.rl_ff_v, cfg.rl_ff_a, dout, H, N
            )
        elif "audio" in self.modalities:
            self.a_enc = UniModalEncoder(cfg.d_aud, cfg.d_model, cfg.rl_ff_a, dout, H, N)
        else:
            self.v_enc = UniModalEncoder(cfg.d_vid, cfg.d_model, cfg.rl_ff_v, dout, H, N)
        fusion = dict(
            modalities=self.modalities,
            d_caps=d_caps,
            d_aud=cfg.d_aud,
            d_vid=cfg.d_vid,
            d_model=cfg.d_model,
            dout_p=dout,
            H=H,
        )
        self.bm_worker_fus = Fusion(N, **fusion)
        if self.hierarchical:
            self.bm_manager_fus = Fusion(N, **fusion)
            self.manager = Manager(d_caps, cfg.rl_goal_d, dout)
            self.worker = Worker(d_caps, cfg.rl_goal_d, vocab_size, cfg.rl_goal_att_heads, dout, cfg.d_model)
        else:
            self.projection = nn.Linear(d_caps, vocab_size)
        self.exploration = False
        self.rng = torch.Generator().manual_seed(0)

    @contextmanager
    def drawing_from(self, rng: torch.Generator | RowStreams) -> Iterator[None]:
        """Sample and explore with `rng` instead of `self.rng` for a while (an RL step's per-sample streams)."""
        previous, self.rng = self.rng, rng
        try:
            yield
        finally:
            self.rng = previous

    # ---- training phases --------------------------------------------------------------------------------------
    def module_groups(self) -> dict[str, list[nn.Module]]:
        """What each RL phase trains: the worker side (encoder, worker fusion, worker) and the manager side
        (manager fusion, manager). The critic is never trained here; the word embeddings only with
        `unfreeze_word_emb` (with the worker)."""
        encoder = [m for name in ("bm_enc", "a_enc", "v_enc") if (m := getattr(self, name, None)) is not None]
        embedding = [self.emb_C] if self.cfg.unfreeze_word_emb else []
        if not self.hierarchical:
            return {"worker": [*embedding, *encoder, self.bm_worker_fus, self.projection]}
        return {
            "worker": [*embedding, *encoder, self.bm_worker_fus, self.worker],
            "manager": [self.bm_manager_fus, self.manager],
        }

    def set_phase(self, phase: str) -> None:
        """'warm_start' (everything trainable, no exploration), 'worker' or 'manager' (only that side
        trainable; the manager phase explores). Frozen = requires_grad False; use one optimiser per group
        (`module_groups`) so that no stale Adam moments move a frozen side."""
        groups = self.module_groups()
        if phase not in ("warm_start", *groups):
            raise ValueError(f"phase {phase!r}: expected warm_start or one of {', '.join(groups)}")
        for name, modules in groups.items():
            for module in modules:
                module.requires_grad_(phase in ("warm_start", name))
        self.exploration = phase == "manager"

    # ---- encoder ----------------------------------------------------------------------------------------------
    def encode(self, video, video_mask, audio, audio_mask) -> Memory:
        def mask3(features, mask):
            if features is None:
                return None
            if mask is None:
                return torch.ones(
                    features.shape[0], 1, features.shape[1], dtype=torch.bool, device=features.device
                )
            return mask[:, None, :]

        video_mask = mask3(video, video_mask) if "video" in self.modalities else None
        audio_mask = mask3(audio, audio_mask) if "audio" in self.modalities else None
        if len(self.modalities) == 2:
            video, audio = self.bm_enc(self.pos_enc_V(video), self.pos_enc_A(audio), video_mask, audio_mask)
            return Memory(video, audio, video_mask, audio_mask)
        if "audio" in self.modalities:
            return Memory(None, self.a_enc(self.pos_enc_A(audio), audio_mask), None, audio_mask)
        return Memory(self.v_enc(self.pos_enc_V(video), video_mask), None, video_mask, None)

    # ---- teacher-forced decoder -------------------------------------------------------------------------------
    def forward(self, video, video_mask, audio, audio_mask, captions: torch.Tensor) -> AgentOutput:
        """Teacher-forced pass: log-probs of the next token at every position of `captions` (the decoder input,
        e.g. `caption[:, :-1]`)."""
        return self.decode(self.encode(video, video_mask, audio, audio_mask), captions)

    def decode(self, memory: Memory, captions: torch.Tensor) -> AgentOutput:
        C_mask = causal_mask(captions != self.pad_idx)
        embedded = self.emb_C(captions)
        C = self.pos_enc_C(embedded)
        worker_feat = self.bm_worker_fus(C, self.bm_worker_fus.memory_kv(memory), memory, C_mask)
        if not self.hierarchical:
            return AgentOutput(F.log_softmax(self.projection(worker_feat), -1), worker_feat, None, None, None)
        starts = self.critic.goal_starts(captions, embedded, self.cfg.goal_timing)
        starts[:, 0] = True
        manager_feat = self.bm_manager_fus(C, self.bm_manager_fus.memory_kv(memory), memory, C_mask)
        goals, _ = self._explore(self.manager(manager_feat), self.exploration and self.training)
        goals = expand_goals(goals, starts)
        log_probs = self.worker(worker_feat, goals, C_mask)
        return AgentOutput(log_probs, worker_feat, manager_feat, goals, starts)

    def _explore(self, goals: torch.Tensor, explore: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The original's exploration distribution, goal + N(0.05·mean, (0.2·std)²), with mean and std taken
        over each goal vector (detached) and an independent draw per row and position from `self.rng` (the
        original shared one draw across the batch and time and used batch statistics). Returns the explored
        goals (gradient flows to the manager's output) and the log-density of each (with respect to the
        manager's mean, for policy gradients)."""
        if not explore:
            return goals, None
        detached = goals.detach()
        shift = 0.05 * detached.mean(-1, keepdim=True)
        scale = (0.2 * detached.std(-1, keepdim=True)).clamp_min(1e-6)
        noise = normal(tuple(goals.shape), self.rng).to(goals)
        explored = goals + shift + scale * noise
        log_prob = torch.distributions.Normal(goals + shift, scale).log_prob(explored.detach()).sum(-1)
        return explored, log_prob

    # ---- incremental decoder ----------------------------------------------------------------------------------
    def start_decoding(self, memory: Memory, explore: bool = False) -> DecodeState:
        stacks = {"worker": self.bm_worker_fus}
        if self.hierarchical:
            stacks["manager"] = self.bm_manager_fus
        caches = {name: [KVCache() for _ in stack.decoder.layers] for name, stack in stacks.items()}
        segmenter = None
        if self.hierarchical:
            caches["goal"] = [KVCache()]
            rows = next(t for t in memory._tensors() if t is not None)
            segmenter = self.critic.start(rows.shape[0], rows.device)
        memory_kv = {name: stack.memory_kv(memory) for name, stack in stacks.items()}
        return DecodeState(memory, memory_kv, caches, segmenter, None, explore)

    def step(self, ids_t: torch.Tensor, state: DecodeState) -> StepOutput:
        """Feed the token at position `state.t` (B,); returns the next token's log-probs and advances `state`.
        Equals `decode` on the whole prefix at its last position (up to float rounding), padding in the prefix
        (a generated pad token, finished rows) masked the same way."""
        ids = ids_t[:, None]
        token_mask = ids != self.pad_idx
        if state.token_mask is not None:
            token_mask = torch.cat((state.token_mask, token_mask), 1)
        state.token_mask, C_mask = token_mask, token_mask[:, None, :]
        embedded = self.emb_C(ids)
        C = self.pos_enc_C(embedded, start=state.t)
        memory, caches = state.memory, state.caches
        worker_feat = self.bm_worker_fus(C, state.memory_kv["worker"], memory, C_mask, caches["worker"])
        if not self.hierarchical:
            state.t += 1
            log_probs = F.log_softmax(self.projection(worker_feat[:, 0]), -1)
            return StepOutput(log_probs, None, None, worker_feat[:, 0], None, None)
        start = self.critic.step(ids_t, embedded, state.segmenter, self.cfg.goal_timing)
        if state.t == 0:
            start = torch.ones_like(start)
        manager_feat = self.bm_manager_fus(C, state.memory_kv["manager"], memory, C_mask, caches["manager"])
        goal, goal_log_prob = self._explore(self.manager(manager_feat[:, 0]), state.explore)
        goal = goal if state.goal is None else torch.where(start[:, None], goal, state.goal)
        state.goal = goal
        log_probs = self.worker(worker_feat, goal[:, None], C_mask, caches["goal"][0])[:, 0]
        state.t += 1
        if goal_log_prob is not None:
            goal_log_prob = goal_log_prob * start
        return StepOutput(log_probs, start, goal_log_prob, worker_feat[:, 0], manager_feat[:, 0], goal)


class ValueFunction(nn.Module):
    """A value head on detached agent features: `projection(ReLU(value_function(x)))`, (B, L). The worker's
    takes [worker_feat ; goals] (364-d at paper size), the manager's takes manager_feat (300-d)."""

    def __init__(self, d_in: int, dout_p: float = 0.1):
        super().__init__()
        self.value_function = PositionwiseFeedForward(d_in, 2 * d_in, dout_p)
        self.projection = nn.Linear(d_in, 1)

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        x = torch.cat([f.detach() for f in features], dim=-1)
        return self.projection(F.relu(self.value_function(x))).squeeze(-1)


def worker_value_function(cfg: AgentConfig = AgentConfig()) -> ValueFunction:
    return ValueFunction(cfg.d_model_caps + cfg.rl_goal_d, cfg.dout_p)


def manager_value_function(cfg: AgentConfig = AgentConfig()) -> ValueFunction:
    return ValueFunction(cfg.d_model_caps, cfg.dout_p)


def trainable_parameters(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


def load_original_state_dict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> list[str]:
    """Load a state dict in the original's layout (agent, value function or critic.cp) into `module`.

    Drops the original's never-applied fusion feed-forward keys and a DataParallel `module.` prefix, then loads
    strictly. Returns the dropped keys (for a note in the log). Raises InputError naming `source` when the
    vocabulary size differs, and the fitting size flags or the keys otherwise (utilities.checkpoint)."""
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    dropped = sorted(k for k in state if DEAD_KEY.match(k))
    for key in dropped:
        del state[key]
    expected = module.state_dict()
    vocab_size = getattr(module, "vocab_size", None)
    for key in ("emb_C.embedder.weight", "worker.projection.weight", "projection.weight"):
        if vocab_size is not None and key in state and key in expected and state[key].shape[0] != vocab_size:
            raise InputError(
                f"{source}: the checkpoint's vocabulary has {state[key].shape[0]} tokens ({key}) but ours has "
                f"{vocab_size}: give the checkpoint's vocabulary (--vocab_path)"
            )
    load_model_state(module, state, source)
    return dropped
