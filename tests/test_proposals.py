"""BMT's proposal generator (model/captioning/proposals.py): head layout, decoding, selection, losses, anchors;
and its checkpoint files (epoch_loops/captioning/proposal_files.py), BMT's pickled Config included."""

from __future__ import annotations

import math
import os
import sys
import types

import numpy as np
import pytest
import torch

from epoch_loops.captioning.proposal_files import (
    load_bmt_file,
    load_proposal_generator,
    proposal_checkpoint,
    stored_config,
)
from model.captioning.proposals import (
    STRIDES,
    HeadOutput,
    ProposalConfig,
    ProposalGenerator,
    ProposalHead,
    decode,
    kmeans_anchors,
    nms,
    proposal_loss,
    select_proposals,
)
from utilities.errors import InputError

SMALL = ProposalConfig(
    d_vid=16,
    d_aud=8,
    d_model=16,
    H=2,
    N=1,
    d_ff_vid=32,
    d_ff_aud=16,
    conv_layers_audio=(8, 8),
    conv_layers_video=(8, 8),
    kernel_sizes_audio=(1, 3),
    kernel_sizes_video=(1, 5),
    anchors={"audio": (1.0, 3.0, 9.0), "video": (2.0, 5.0, 20.0, 60.0)},
)


def small_inputs(B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    video, audio = torch.rand(B, 300, 16, generator=g), torch.rand(B, 800, 8, generator=g)
    return video, torch.ones(B, 1, 300, dtype=torch.bool), audio, torch.ones(B, 1, 800, dtype=torch.bool)


def test_head_channels_are_anchor_major_triples():
    """Output channel c is component c % 3 of anchor c // 3 (the original's view)."""
    head = ProposalHead(4, (6,), kernel_size=3, n_anchors=2, dout_p=0.0)
    last = head.conv_layers[-1]
    torch.nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.copy_(torch.arange(6.0))
    raw = head(torch.randn(1, 5, 4))
    assert raw.shape == (1, 2, 5, 3)
    assert raw[0, 1, 4].tolist() == [3.0, 4.0, 5.0]
    assert raw[0, 0, 2].tolist() == [0.0, 1.0, 2.0]


def test_a_head_without_dropout_has_the_original_indices():
    keys = ProposalHead(4, (6, 6), kernel_size=3, n_anchors=2, dout_p=0.0).state_dict().keys()
    assert sorted({k.split(".")[1] for k in keys}) == ["0", "2", "4"]


def test_state_dict_has_the_original_key_layout():
    keys = ProposalGenerator(SMALL).state_dict().keys()
    assert "encoder.encoder_AV.layers.0.self_att_M1.linear_Q2d.weight" in keys
    assert "detection_layers_A.1.conv_layers.0.weight" in keys
    assert "detection_layers_V.0.conv_layers.6.bias" in keys
    assert not any("anchors" in k or "pos_enc" in k for k in keys)
    model = ProposalGenerator(SMALL)
    # M1 = audio: the audio self-attention projects from the audio width
    assert model.encoder.encoder_AV.layers[0].self_att_M1.linear_Q2d.in_features == 8
    assert model.detection_layers_A[1].conv_layers[0].kernel_size == (3,)


def test_decoding_a_hand_computed_head():
    """2 anchors (1.2 s, 4.8 s), 3 cells of the audio stride 0.96 s."""
    raw = torch.zeros(1, 2, 3, 3)
    raw[0, 0, 1] = torch.tensor([0.0, math.log(2.0), 0.0])  # centre (0.5+1)·0.96, length 2·1.2, score 0.5
    raw[0, 1, 2] = torch.tensor([math.log(3.0), 0.0, math.log(4.0)])  # σ = 0.75, score 0.8
    out = HeadOutput("audio", raw, torch.tensor([1.2, 4.8]), 0.96)
    p = decode([out])[0]
    assert p.shape == (6, 3)
    # flat order: anchor 0 cells 0..2, then anchor 1 cells 0..2
    centre, length = 1.5 * 0.96, 2.4
    assert p[1].tolist() == pytest.approx([centre - length / 2, centre + length / 2, 0.5], abs=1e-6)
    centre = 2.75 * 0.96
    assert p[5].tolist() == pytest.approx([centre - 2.4, centre + 2.4, 0.8], abs=1e-6)
    assert p[0].tolist() == pytest.approx([0.48 - 0.6, 0.48 + 0.6, 0.5], abs=1e-6)
    # cells beyond a video's own grid are never selected
    limited = decode([out], {"audio": torch.tensor([2])})[0]
    assert limited[2, 2] == -1 and limited[5, 2] == -1 and limited[1, 2] == 0.5


def test_selection_clips_drops_short_ones_then_takes_the_top_k():
    props = torch.tensor(
        [
            [-3.0, 5.0, 0.9],  # start clipped to 0
            [30.0, 50.0, 0.7],  # end clipped to D
            [36.0, 40.0, 0.95],  # outside [0, D]: clipped length ≤ 0, dropped
            [10.0, 10.2, 0.99],  # 0.2 s: not strictly longer, dropped
            [1.0, 2.0, 0.7],  # ties with row 1: flat order kept
            [4.0, 9.0, 0.1],
        ]
    )
    D = 35.155
    top = select_proposals(props, D, k=3)
    assert top[:, 2].tolist() == pytest.approx([0.9, 0.7, 0.7])
    assert top[0, :2].tolist() == [0.0, 5.0]
    assert top[1, 0] == 30.0 and top[1, 1] == torch.tensor(D, dtype=torch.float32)
    assert top[2, :2].tolist() == [1.0, 2.0]
    assert len(select_proposals(props, D, k=100)) == 4
    assert len(select_proposals(props[2:4], D, k=5)) == 0


def test_nms_drops_overlaps_of_kept_proposals():
    props = torch.tensor([[0.0, 10.0, 0.9], [1.0, 10.0, 0.8], [20.0, 30.0, 0.7], [0.0, 4.0, 0.6]])
    assert nms(props, 0.5)[:, 2].tolist() == pytest.approx([0.9, 0.7, 0.6])  # tIoU 0.9 ≥ 0.5; 0.4 < 0.5
    assert nms(props, 0.95)[:, 2].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])


def per_cell_loss(raw: torch.Tensor, anchors: list[float], stride: float, segments, cfg) -> float:
    """The YOLO loss cell by cell, in plain Python: the target dict is filled in segment order (a later
    segment on the same cell and anchor wins)."""
    B, A, S, _ = raw.shape
    owned = {}
    for b, video in enumerate(segments):
        for centre, length in video:
            a = max(range(A), key=lambda i: min(length, anchors[i]) / max(length, anchors[i]))
            j = min(max(math.floor(centre / stride), 0), S - 1)
            owned[(b, a, j)] = (centre / stride - math.floor(centre / stride), math.log(length / anchors[a]))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    xy, wh, obj, noobj = [], [], [], []
    for b in range(B):
        for a in range(A):
            for j in range(S):
                t_c, t_l, t_o = (float(v) for v in raw[b, a, j])
                if (b, a, j) in owned:
                    tc, tl = owned[(b, a, j)]
                    xy.append((sig(t_c) - tc) ** 2)
                    wh.append((t_l - tl) ** 2)
                    obj.append(-math.log(sig(t_o)))
                else:
                    noobj.append(-math.log(1 - sig(t_o)))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return mean(xy) + mean(wh) + cfg.obj_coeff * mean(obj) + cfg.noobj_coeff * mean(noobj)


def test_losses_match_a_per_cell_implementation():
    torch.manual_seed(0)
    anchors = [1.0, 4.0, 12.0]
    raw = torch.randn(2, 3, 7, 3, dtype=torch.float64)
    segments = [[(3.1, 1.5), (3.3, 1.4), (60.0, 10.0)], [(0.2, 20.0)]]  # same cell+anchor twice; beyond grid
    out = HeadOutput("video", raw, torch.tensor(anchors), STRIDES["video"])
    got = proposal_loss([out], segments, SMALL)
    want = per_cell_loss(raw, anchors, STRIDES["video"], segments, SMALL)
    assert float(got) == pytest.approx(want, rel=1e-5)
    two = proposal_loss([out, out], segments, SMALL)  # summed over heads
    assert float(two) == pytest.approx(2 * want, rel=1e-5)


def test_kmeans_anchors_are_sorted_centres_of_the_lengths():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.normal(m, 0.1, 200) for m in (2.0, 10.0, 50.0)] + [[0.0, -1.0]])
    anchors = kmeans_anchors(lengths, 3)
    assert anchors == pytest.approx((2.0, 10.0, 50.0), abs=0.05)
    assert list(anchors) == sorted(anchors)
    KMeans = pytest.importorskip("sklearn.cluster").KMeans
    x = lengths[lengths > 0]
    ours = kmeans_anchors(x, 8)
    theirs = KMeans(8, init="random", n_init=10, random_state=13).fit(x[:, None])
    inertia = lambda c: float(np.min((x[:, None] - np.asarray(c)[None]) ** 2, 1).sum())  # noqa: E731
    assert inertia(ours) <= 1.05 * theirs.inertia_
    with pytest.raises(ValueError, match="distinct"):
        kmeans_anchors(np.array([1.0, 1.0, 2.0]), 3)


# ---- checkpoint files ---------------------------------------------------------------------------------------


@pytest.fixture
def bmt_config_class(monkeypatch):
    """BMT's `utilities.config_constructor.Config`, present only while a test writes its pickle."""
    module = types.ModuleType("utilities.config_constructor")
    Config = type("Config", (), {"__module__": "utilities.config_constructor"})
    module.Config = Config
    monkeypatch.setitem(sys.modules, "utilities.config_constructor", module)
    return Config


def bmt_layout(model: ProposalGenerator, Config) -> dict:
    """The dict BMT's train_prop saves: a Config object and numpy float32 anchors."""
    state = proposal_checkpoint(model, 3, None, {"Average across tIoUs": {"Recall": 0.5}}, 0.4)
    config = Config()
    config.__dict__.update(stored_config(model.cfg, device="cuda:0", pretrained_cap_model_path="/home/x.pt"))
    state["config"] = config
    state["anchors"] = {m: [np.float32(a) for a in v] for m, v in state["anchors"].items()}
    return state


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_bmt_file_loads_without_its_classes(tmp_path, bmt_config_class, monkeypatch, legacy):
    torch.manual_seed(0)
    model = ProposalGenerator(SMALL).eval()
    path = tmp_path / "best_prop_model.pt"
    torch.save(bmt_layout(model, bmt_config_class), path, _use_new_zipfile_serialization=not legacy)
    monkeypatch.delitem(sys.modules, "utilities.config_constructor")
    with open(path, "rb") as f:
        assert (f.read(2) == b"PK") != legacy
    loaded, state = load_proposal_generator(path)
    assert state["config"]["device"] == "cuda:0" and isinstance(state["config"], dict)
    assert state["anchors"]["audio"] == [1.0, 3.0, 9.0] and type(state["anchors"]["audio"][0]) is float
    inputs = small_inputs()
    assert torch.equal(decode(loaded.eval()(*inputs)), decode(model(*inputs)))


class Foreign:
    """A pickled object that would create a directory while being unpickled."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_a_foreign_pickled_object_is_refused_and_never_runs(tmp_path, bmt_config_class, legacy):
    state = bmt_layout(ProposalGenerator(SMALL), bmt_config_class)
    target = tmp_path / "created_by_the_pickle"
    state["epoch"] = Foreign(str(target))
    path = tmp_path / "evil.pt"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(InputError, match="refused to load") as e:
        load_bmt_file(path)
    assert "\n" not in str(e.value) and "makedirs" in str(e.value)
    assert not target.exists()


def test_a_checkpoint_of_another_model_is_one_line(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "epoch": 1}, path)
    with pytest.raises(InputError, match="not a proposal generator checkpoint") as e:
        load_proposal_generator(path)
    assert "\n" not in str(e.value)
    state = proposal_checkpoint(ProposalGenerator(SMALL), 1, None, None, None)
    state["model_state_dict"] = {"encoder.w": torch.zeros(1)}
    torch.save(state, path)
    with pytest.raises(InputError, match="does not fit") as e:
        load_proposal_generator(path)
    assert "\n" not in str(e.value)


def test_detection_half_of_the_evaluator_by_hand():
    """P/R at tIoU > t, F1 per tIoU, and the F1 of the mean P and R (no Java needed)."""
    from evaluation.densevid import AVERAGE_KEY, DenseCaptioningEvaluator

    reference = {"v": {"duration": 10, "timestamps": [[0, 4], [5, 10]], "sentences": ["a", "b"]}}
    proposals = {"v": [{"sentence": "", "timestamp": t} for t in ([0, 4], [0, 10], [6, 10])]}
    with DenseCaptioningEvaluator([reference], tious=(0.3, 0.5, 0.9), detection_only=True) as evaluator:
        metrics = evaluator.detection(proposals)
    assert metrics["0.3"] == pytest.approx({"Precision": 1.0, "Recall": 1.0, "F1": 1.0})
    assert metrics["0.5"] == pytest.approx({"Precision": 2 / 3, "Recall": 1.0, "F1": 0.8})
    assert metrics["0.9"] == pytest.approx({"Precision": 1 / 3, "Recall": 0.5, "F1": 0.4})
    assert metrics[AVERAGE_KEY] == pytest.approx({"Precision": 2 / 3, "Recall": 5 / 6, "F1": 20 / 27})
