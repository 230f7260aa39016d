"""`predict` without timestamps: the proposals of one video from a proposal generator checkpoint (BMT's
single-video tool), optionally captioned by the agent. Real features of the sample video."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from epoch_loops.captioning.proposal_files import proposal_checkpoint, stored_config
from main import main
from model.captioning.proposals import ProposalConfig, ProposalGenerator, decode, kmeans_anchors
from tests.test_captioning import direct_captions, sample_checkpoint
from utilities.checkpoint import save_checkpoint

VIDEO_ID, DURATION = "women_long_jump", 35.155
# real feature widths, small everything else; a few anchors spread over the sample's length
SMALL_REAL = ProposalConfig(
    d_model=32,
    H=2,
    N=1,
    d_ff_vid=64,
    d_ff_aud=32,
    conv_layers_audio=(16, 16),
    conv_layers_video=(16, 16),
    kernel_sizes_audio=(5, 13),
    kernel_sizes_video=(1, 9),
    anchors={"audio": (1.5, 6.0, 20.0), "video": (3.0, 12.0, 30.0, 80.0)},
)


def bmt_file(path, model: ProposalGenerator, monkeypatch) -> None:
    """`model` saved as BMT's train_prop saved it: legacy format, a pickled Config, numpy float32 anchors."""
    module = types.ModuleType("utilities.config_constructor")
    Config = type("Config", (), {"__module__": "utilities.config_constructor"})
    module.Config = Config
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "utilities.config_constructor", module)
        state = proposal_checkpoint(model, 5, None, None, 0.3)
        config = Config()
        config.__dict__.update(stored_config(model.cfg, device="cuda:0"))
        state["config"] = config
        state["anchors"] = {k: [np.float32(a) for a in v] for k, v in state["anchors"].items()}
        torch.save(state, path, _use_new_zipfile_serialization=False)


def argv(prop, sample, out, *extra) -> list[str]:
    return [
        "--procedure", "predict", "--prop_generator_model_path", str(prop), "--video_features_path", str(sample),
        "--audio_features_path", str(sample), "--video_id", VIDEO_ID, "--duration", str(DURATION),
        "--predictions_out", str(out), "--device", "cpu", "--log_dir", str(out.parent / "log"), *extra,
    ]  # fmt: skip


def reference_proposals(model: ProposalGenerator, sample, k: int, nms: float | None = None) -> list[dict]:
    """BMT's single-video tool step by step: pad rgb/flow/vggish to 300/800 rows with 1.0/0.0/1.0, masks from the sentinel,
    every cell of every head decoded in plain Python, clipped, filtered, sorted (stable), top k, NMS."""
    rgb, flow, vggish = (np.load(sample / f"{VIDEO_ID}_{n}.npy") for n in ("rgb", "flow", "vggish"))
    pad = lambda x, n, v: np.concatenate([x, np.full((n - len(x), x.shape[1]), v, np.float32)])  # noqa: E731
    rgb, flow, vggish = pad(rgb, 300, 1.0), pad(flow, 300, 0.0), pad(vggish, 800, 1.0)
    V, A = torch.from_numpy(rgb + flow)[None], torch.from_numpy(vggish)[None]
    V_mask = torch.from_numpy(rgb[:, 0] != 1.0)[None, None]
    A_mask = torch.from_numpy(vggish[:, 0] != 1.0)[None, None]
    with torch.no_grad():
        outputs = model.eval()(V, V_mask, A, A_mask)
    D = float(np.float32(DURATION))
    rows = []
    for out in outputs:
        raw = out.raw[0].double().numpy()
        stride = np.float32(out.stride)
        for a, anchor in enumerate(out.anchors.tolist()):
            for j in range(raw.shape[1]):
                t_c, t_l, t_o = raw[a, j]
                centre = (1 / (1 + math.exp(-t_c)) + j) * stride
                length = anchor * math.exp(t_l)
                start, end = centre - length / 2, centre + length / 2
                start, end = min(max(start, 0.0), D), min(end, D)
                if end - start > 0.2:
                    rows.append((start, end, 1 / (1 + math.exp(-t_o))))
    rows = sorted(rows, key=lambda r: -r[2])[:k]  # Python's sort is stable
    if nms is not None:
        kept = []
        for s, e, p in rows:
            tious = [(min(e, e2) - max(s, s2)) / (max(e, e2) - min(s, s2)) for s2, e2, _ in kept]
            if all(t < nms for t in tious):
                kept.append((s, e, p))
        rows = kept
    return [{"start": s, "end": e, "proposal_score": p} for s, e, p in rows]


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert list(g) == ["start", "end", "proposal_score"]
        assert [g[k] for k in w] == pytest.approx([w[k] for k in w], abs=2e-5)


@pytest.fixture
def small_generator(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = ProposalGenerator(SMALL_REAL)
    bmt_file(tmp_path / "best_prop_model.pt", model, monkeypatch)
    return model, tmp_path / "best_prop_model.pt"


def test_proposals_only_follow_the_original_step_by_step(shared_data, tmp_path, small_generator, capsys):
    sample = shared_data / "sample_features"
    model, path = small_generator
    out = tmp_path / "p.json"
    assert main(argv(path, sample, out, "--max_prop_per_vid", "9", "--proposals_only")) == 0
    got = json.loads(out.read_text())
    assert got == json.loads(capsys.readouterr().out)
    assert_same(got, reference_proposals(model, sample, 9))
    scores = [r["proposal_score"] for r in got]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= r["start"] < r["end"] <= np.float32(DURATION) for r in got)

    assert (
        main(
            argv(
                path, sample, out, "--max_prop_per_vid", "30", "--proposals_only", "--nms_tiou_thresh", "0.4"
            )
        )
        == 0
    )
    nms = json.loads(out.read_text())
    assert_same(nms, reference_proposals(model, sample, 30, nms=0.4))
    assert len(nms) < 30


def test_proposals_are_captioned_by_the_agent(shared_data, tmp_path, small_generator):
    sample = shared_data / "sample_features"
    _, path = small_generator
    agents = sample_checkpoint(tmp_path / "agent")
    out = tmp_path / "c.json"
    extra = ["--max_prop_per_vid", "3", "--rl_pretrained_model_dir", str(tmp_path / "agent")]
    assert main(argv(path, sample, out, *extra)) == 0
    got = json.loads(out.read_text())
    assert [list(r) for r in got] == [["start", "end", "proposal_score", "sentence"]] * 3
    segments = [(r["start"], r["end"]) for r in got]
    assert [r["sentence"] for r in got] == direct_captions(agents, sample, segments, DURATION)


def test_bad_input_is_one_line(shared_data, tmp_path, small_generator, capsys):
    sample = shared_data / "sample_features"
    _, path = small_generator
    out = tmp_path / "x.json"
    assert (
        main(argv(path, sample, out, "--max_prop_per_vid", "3")) == 2
    )  # neither captions nor --proposals_only
    assert "--proposals_only" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    for name, dim in (("rgb", 1024), ("flow", 1024), ("vggish", 128)):
        np.save(empty / f"{VIDEO_ID}_{name}.npy", np.zeros((0, dim), np.float32))
    assert main(argv(path, empty, out, "--proposals_only")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("row" in err or "T ≥ 1" in err)
    for flag, value in (("--duration", "0"), ("--max_prop_per_vid", "0")):
        with pytest.raises(SystemExit):
            main([*argv(path, sample, out, "--proposals_only"), flag, value])
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.slow
def test_paper_size_generator_on_the_sample_video(shared_data, tmp_path, capsys):
    """BMT's sizes (248,150,432 parameters), anchors from the real train.json; 768,000 decoded predictions."""
    sample = shared_data / "sample_features"
    train = json.loads((shared_data / "activitynet" / "train.json").read_text())
    lengths = np.array([e - s for v in train.values() for s, e in v["timestamps"]])
    anchors = {"audio": kmeans_anchors(lengths, 48), "video": kmeans_anchors(lengths, 128)}
    torch.manual_seed(0)
    model = ProposalGenerator(ProposalConfig(anchors=anchors)).eval()
    assert sum(p.numel() for p in model.parameters()) == 248_150_432
    save_checkpoint(tmp_path / "best_prop_model.pt", proposal_checkpoint(model, 0, None, None, None))
    out = tmp_path / "p.json"
    assert (
        main(
            argv(
                tmp_path / "best_prop_model.pt", sample, out, "--max_prop_per_vid", "100", "--proposals_only"
            )
        )
        == 0
    )
    got = json.loads(out.read_text())
    assert len(got) == 100
    scores = [r["proposal_score"] for r in got]
    assert scores == sorted(scores, reverse=True)
    assert all(r["start"] >= 0 and r["end"] - r["start"] > 0.2 for r in got)
    with torch.no_grad():
        V, A = torch.ones(1, 300, 1024), torch.ones(1, 800, 128)
        mask = lambda n: torch.ones(1, 1, n, dtype=torch.bool)  # noqa: E731
        assert decode(model(V, mask(300), A, mask(800))).shape == (1, 768_000, 3)
