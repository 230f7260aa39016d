"""`main.py --procedure train_critic`: train the segment critic that tells the BMHRL agent where a
sub-goal ends, and write it as the original's `critic.cp` for `train_rl_cap --rl_critic_path`.

Input (chosen by the file extension): a caption CSV, labelled per token by the heuristic segmenter (a token ends
a segment when it is punctuation or the next token is a clause-joining word), or a Charades-Captions-style JSON
with per-word `seg_labels` (`datasets/captioning/segment_labels.py`). The critic reads what the agent feeds it: the decoder
input `<s> w1 … wn` embedded with the agent's vocabulary and word vectors (× √d). Those embeddings are not part of
`critic.cp`, so with GloVe the critic serves any vocabulary; with `--word_emb_caps random` it only fits an agent
with the same vocabulary and `--seed`.

Loss: binary cross-entropy per real token (padding masked). Boundaries are rare (about 7% of ActivityNet tokens);
the imbalance is met at the decision, not in the loss: plain BCE (`--critic_pos_weight 1`) keeps sigmoid(logit) a
calibrated probability, and the agent's threshold 0.25 (below 0.5) already leans to recall. Weighting boundaries
by the class ratio would inflate the probabilities and, at 0.25, mark nearly every token. Every epoch: boundary precision / recall / F1 on the held-out captions at the agent's
threshold `--rl_critic_score_threshhold`; the best epoch on held-out F1 is what `critic.cp` holds.

Under torchrun (`torchrun --nproc_per_node=N main.py --procedure train_critic`) `--B` is the global batch: the
captions' order is drawn from one seeded generator (the same on every rank, saved for `--resume`, so a run may
continue on another number of processes), each rank trains on its contiguous share of every global batch, and the
loss is normalised by the global token count, so the averaged gradient is the one-process gradient. The held-out
captions are split into one contiguous part per rank (no padding: each caption counted once) and the boundary
counts summed over the ranks. Rank 0 writes every file and prints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from datasets.captioning.activitynet import read_captions_csv
from datasets.captioning.segment_labels import LabelledCaption, read_seg_labels_json
from datasets.embeddings import embedding_matrix
from datasets.vocabulary import Vocabulary, tokenize, vocabulary_from_config
from epoch_loops.training import (
    Optimisation,
    Saver,
    checkpoint_state,
    optimiser_step,
    print_best,
    resume,
)
from model.blocks import VocabularyEmbedder
from model.captioning.bmhrl import HeuristicSegmenter, SegmentCritic, trainable_parameters
from utilities import distributed
from utilities.checkpoint import load_checkpoint
from utilities.config import Config
from utilities.distributed import global_sum, loss_normaliser, share
from utilities.errors import InputError
from utilities.log import progress
from utilities.run_dir import RunDir, is_rank0, say
from utilities.seeding import Stream, data_generator, stream_seed

log = logging.getLogger(__name__)
CRITIC_FILE = "critic.cp"  # the best epoch, original layout
LAST_FILE = "train_critic_last.pt"  # the full training state after the last epoch, for --resume


# ---- data -------------------------------------------------------------------------------------------------------
def read_labelled_captions(path: str | Path) -> list[LabelledCaption]:
    """`.json`: per-word labels as given; anything else: a caption CSV labelled by the heuristic segmenter."""
    if Path(path).suffix.lower() == ".json":
        return read_seg_labels_json(path)
    return heuristic_labels([segment.caption for segment in read_captions_csv(path).segments])


def heuristic_labels(captions: list[str]) -> list[LabelledCaption]:
    """Label each token with `HeuristicSegmenter`'s rule, applied to the tokens themselves (a vocabulary of this
    file's words, so a held-out word unknown to the training vocabulary is still labelled by what it is). Each
    caption is seen as `<s> w1 … wn </s>`, so the last word is not followed by a joining word."""
    token_lists = tokenize(captions)
    itos = ["<unk>", "<blank>", "<s>", "</s>", *sorted({t for tokens in token_lists for t in tokens})]
    stoi = {token: i for i, token in enumerate(itos)}
    segmenter = HeuristicSegmenter(itos, special_ids=(1, 2, 3))
    labelled = []
    for caption, tokens in zip(captions, token_lists, strict=True):
        ids = torch.tensor([[2, *(stoi[t] for t in tokens), 3]])
        ends = segmenter.segment_ends(ids)[0, 1:-1]
        labelled.append(LabelledCaption(caption, tokens, ends.int().tolist()))
    return labelled


@dataclass
class CriticData:
    """Token ids of `<s> w1 … wn` (the agent's decoder input) and one 0/1 label per position (`<s>`: 0)."""

    ids: list[torch.Tensor]
    labels: list[torch.Tensor]

    @classmethod
    def encode(cls, captions: list[LabelledCaption], vocab: Vocabulary) -> CriticData:
        ids = [torch.tensor(vocab.encode(c.tokens)[:-1]) for c in captions]
        labels = [torch.tensor([0, *c.labels], dtype=torch.float32) for c in captions]
        return cls(ids, labels)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(
        self, index: list[int], pad_idx: int, device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, labels, mask) padded to the longest caption; mask is True at real tokens."""
        ids = torch.nn.utils.rnn.pad_sequence([self.ids[i] for i in index], True, pad_idx)
        labels = torch.nn.utils.rnn.pad_sequence([self.labels[i] for i in index], True, 0.0)
        return ids.to(device), labels.to(device), (ids != pad_idx).to(device)


def boundary_rate(data: CriticData) -> float:
    return float(torch.cat(data.labels).mean())


# ---- metrics ----------------------------------------------------------------------------------------------------
@dataclass
class BoundaryCounts:
    """Token-level confusion counts for the positive class 'ends a segment', and how many captions they count."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tokens: int = 0
    captions: int = 0  # counted by `evaluate`: each held-out caption once

    def add(self, decided: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        decided, truth = decided & mask, (labels > 0.5) & mask
        self.tp += int((decided & truth).sum())
        self.fp += int((decided & ~truth).sum())
        self.fn += int((~decided & truth).sum())
        self.tokens += int(mask.sum())

    def scores(self) -> dict[str, float]:
        """Precision, recall and F1 (each 0 where its denominator is 0)."""
        precision = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        recall = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1}


def trivial_baselines(data: CriticData) -> dict[str, dict[str, float]]:
    """What saying 'boundary' at every token, or at none, scores on `data`."""
    scores = {}
    for name, decide in (("all_boundary", True), ("no_boundary", False)):
        counts = BoundaryCounts()
        for labels in data.labels:
            counts.add(torch.full(labels.shape, decide), labels, torch.ones_like(labels, dtype=torch.bool))
        scores[name] = counts.scores()
    return scores


# ---- training ---------------------------------------------------------------------------------------------------
def masked_bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    pos_weight: float,
    normaliser: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the real tokens of the global batch of BCE with boundary tokens weighted by `pos_weight`
    (`normaliser`, by default `loss_normaliser(mask.sum())`: the same gradient on one process and under DDP)."""
    weight = torch.tensor(pos_weight, device=logits.device)
    per_token = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight, reduction="none")
    return (per_token * mask).sum() / (loss_normaliser(mask.sum()) if normaliser is None else normaliser)


def train_epoch(
    critic: SegmentCritic,
    embed: VocabularyEmbedder,
    data: CriticData,
    opt: Optimisation,
    generator: torch.Generator,
    cfg: Config,
    epoch: int,
    pos_weight: float,
    pad_idx: int,
) -> float:
    """One pass over `data` in a seeded order of global batches (this rank trains on its share of each; one
    whose share is empty steps on a stand-in caption); returns the token-weighted mean training loss."""
    critic.train()
    order = torch.randperm(len(data), generator=generator).tolist()
    loss_sum = torch.zeros((), dtype=torch.float64, device=cfg.device)  # on the device: NCCL reduces there
    tokens = torch.zeros((), dtype=torch.float64, device=cfg.device)
    batches = [order[i : i + cfg.B] for i in range(0, len(order), cfg.B)]
    for step, batch in enumerate(progress(batches, desc=f"critic epoch {epoch}"), 1):
        index = share(batch)
        with distributed.stand_in(not index):
            ids, labels, mask = data.batch(index or batch[:1], pad_idx, cfg.device)
            logits, _ = critic.logits(embed(ids))
            normaliser = loss_normaliser(mask.sum())
            loss = masked_bce(logits, labels, mask, pos_weight, normaliser)
            optimiser_step(opt, loss, f"epoch {epoch}, batch {step}")
        if index:  # this rank's summed token loss: loss × normaliser
            loss_sum += float(loss.detach()) * float(normaliser)
            tokens += int(mask.sum())
    return float(global_sum(loss_sum) / global_sum(tokens))


@torch.no_grad()
def evaluate(
    critic: SegmentCritic, embed: VocabularyEmbedder, data: CriticData, batch_size: int, pad_idx: int, device
) -> tuple[float, BoundaryCounts]:
    """Unweighted BCE per token and the boundary counts at the critic's threshold, over `data` in file order.
    `batch_size` is global: under torchrun each rank scores its contiguous part of `data` in batches of its share
    of it, and the sums are added over the ranks (every caption counted once)."""
    critic.eval()
    counts, total = BoundaryCounts(), 0.0
    part = share(range(len(data)))
    local_size = -(-batch_size // distributed.world_size())
    for start in range(0, len(part), local_size):
        ids, labels, mask = data.batch(part[start : start + local_size], pad_idx, device)
        embedded = embed(ids)
        logits, _ = critic.logits(embedded)
        total += float((F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * mask).sum())
        counts.add(critic.segment_ends(ids, embedded), labels, mask)
        counts.captions += len(ids)
    sums = global_sum(
        torch.tensor(
            [total, counts.tp, counts.fp, counts.fn, counts.tokens, counts.captions],
            dtype=torch.float64,
            device=device,
        )
    ).tolist()
    counts = BoundaryCounts(*(round(x) for x in sums[1:]))
    return sums[0] / counts.tokens, counts


def original_state_dict(critic: SegmentCritic) -> dict[str, torch.Tensor]:
    """The plain `critic.cp` state dict (lstm.*, gru.*, lin.*, relu.*, relu2.*), on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in critic.state_dict().items()}


def train_critic(cfg: Config, run: RunDir) -> None:
    train = read_labelled_captions(cfg.train_meta_path)
    heldout = read_labelled_captions(cfg.val_1_meta_path)
    resume_state = (
        load_checkpoint(cfg.resume) if cfg.resume else None
    )  # its vocabulary, before anything is built
    if resume_state is not None:
        vocab = Vocabulary(resume_state.get("vocabulary") or [], source=f"{cfg.resume} (vocabulary)")
    else:  # --vocab_path, or built from the training captions as train_rl_cap builds it
        vocab = vocabulary_from_config(cfg, [c.caption for c in train])
    train_data, heldout_data = CriticData.encode(train, vocab), CriticData.encode(heldout, vocab)

    critic = SegmentCritic(cfg.d_model_caps, cfg.rl_critic_score_threshhold).to(cfg.device)
    opt = Optimisation(
        cfg.procedure, torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr), cfg.grad_clip, run
    )
    generator = data_generator(stream_seed(Stream.SHUFFLE, cfg.seed))
    rate = boundary_rate(train_data)
    if rate == 0:
        raise InputError(f"{cfg.train_meta_path}: no token is labelled as a segment end: nothing to learn")
    pos_weight = cfg.critic_pos_weight
    distributed.check_global_batch("B", cfg.B)
    say(
        f"train_critic: {len(train_data)} training captions ({cfg.train_meta_path}, boundary rate {rate:.3f}), "
        f"{len(heldout_data)} held-out ({cfg.val_1_meta_path}, boundary rate {boundary_rate(heldout_data):.3f})"
    )
    say(f"vocabulary size: {len(vocab)} | boundary pos_weight {pos_weight:g}")
    say(f"trainable parameters: {trainable_parameters(critic)}")
    if cfg.dry_run:  # sizes and counts only: GloVe is not read
        return

    embed = VocabularyEmbedder(
        embedding_matrix(cfg.word_emb_caps, vocab.itos, cfg.d_model_caps, seed=cfg.seed)
    )
    embed = embed.to(cfg.device)
    metrics = {
        "threshold": cfg.rl_critic_score_threshhold,
        "pos_weight": pos_weight,
        "heldout_tokens": sum(len(x) for x in heldout_data.ids),
        "heldout_boundary_rate": boundary_rate(heldout_data),
        "baselines": trivial_baselines(heldout_data),
        "epochs": [],
        "best": None,
    }
    start_epoch = 0
    if resume_state is not None:
        state = resume(opt, cfg.resume, critic, data_generator=generator)
        start_epoch, metrics = state["epoch"], state["metrics"]
    elif is_rank0():
        run.write_json("vocabulary.json", vocab.to_list())
    saver = Saver(run)
    baseline = metrics["baselines"]["all_boundary"]["f1"]
    say(f"held-out trivial baselines: all-boundary F1 {baseline:.3f}, no-boundary F1 0.000")

    for epoch in range(start_epoch + 1, cfg.epoch_num + 1):
        train_loss = train_epoch(
            critic, embed, train_data, opt, generator, cfg, epoch, pos_weight, vocab.pad_idx
        )
        heldout_loss, counts = evaluate(
            critic, embed, heldout_data, cfg.B * cfg.inf_B_coeff, vocab.pad_idx, cfg.device
        )
        scores = counts.scores()
        record = {"epoch": epoch, "train_loss": train_loss, "heldout_loss": heldout_loss, **scores}
        record["heldout_scored"] = {"captions": counts.captions, "tokens": counts.tokens}
        improved = metrics["best"] is None or scores["f1"] > metrics["best"]["f1"]
        metrics["epochs"].append(record)
        if improved:
            metrics["best"] = record
            saver.save(
                CRITIC_FILE, original_state_dict(critic), *([cfg.critic_out] if cfg.critic_out else [])
            )
        if is_rank0():
            report_epoch(run, cfg, record, improved)
            run.write_metrics("metrics.json", metrics, cfg.metrics_out)
        state = checkpoint_state(
            opt,
            cfg,
            critic,
            epoch=epoch,
            best_metric=metrics["best"]["f1"],
            vocabulary=vocab.to_list(),
            data_generator=generator,
            metrics=metrics,
        )
        saver.save(LAST_FILE, state)
        distributed.barrier()  # the epoch's checkpoints are complete before any rank goes on
    best = metrics["best"]
    if best is not None:
        say(
            f"best epoch {best['epoch']}: held-out boundary P {best['precision']:.3f} R {best['recall']:.3f} "
            f"F1 {best['f1']:.3f} (all-boundary F1 {baseline:.3f})"
            + (f"; also written to {cfg.critic_out}" if cfg.critic_out else "")
        )
        print_best(
            f"epoch {best['epoch']}",
            f"F1 {best['f1']:.3f} (held-out boundaries)",
            run.path / "checkpoints" / CRITIC_FILE,
        )
        if best["f1"] < baseline and is_rank0():
            log.warning(
                "the saved critic's held-out F1 %.3f is below the all-boundary baseline's %.3f (a boundary at every "
                "token): it segments worse than no critic at all; train longer, check the labels or "
                "--critic_pos_weight before using it",
                best["f1"],
                baseline,
            )


def report_epoch(run: RunDir, cfg: Config, record: dict, improved: bool) -> None:
    """Console and TensorBoard for one epoch (rank 0 only under torchrun: the run directory's writer)."""
    print(
        f"epoch {record['epoch']}/{cfg.epoch_num}: train loss {record['train_loss']:.4f} | held-out loss "
        f"{record['heldout_loss']:.4f} P {record['precision']:.3f} R {record['recall']:.3f} "
        f"F1 {record['f1']:.3f}{' (best)' if improved else ''}"
    )
    if run.writer is not None:
        for key in ("train_loss", "heldout_loss", "precision", "recall", "f1"):
            run.writer.add_scalar(f"critic/{key}", record[key], record["epoch"])
