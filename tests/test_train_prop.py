"""`--procedure train_prop` on the demo data: the frozen encoder stays bit-identical, best_prop_model.pt reloads to
the same proposals, validation reuses the official evaluator's detection half, and --resume is exact."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from datasets.captioning.activitynet import open_stores, read_captions_csv
from datasets.captioning.proposals import Video, VideoDataset, videos_of
from datasets.demo import ensure_demo_dataset
from epoch_loops.captioning.proposal_files import (
    encoder_from_captioning,
    load_bmt_file,
    load_proposal_generator,
)
from epoch_loops.captioning.proposals import propose, uniform_proposals
from epoch_loops.demo import proposals_demo
from evaluation.densevid import AVERAGE_KEY, DenseCaptioningEvaluator
from main import build_parser, main
from model.captioning.proposals import ProposalConfig, ProposalGenerator
from tests.conftest import requires_java
from tests.test_captioning import sample_checkpoint
from utilities.checkpoint import load_checkpoint
from utilities.config import config_from_argv
from utilities.errors import InputError
from utilities.run_dir import RunDir
from utilities.seeding import seed_everything

SMALL_HEADS = ["--anchors_num_audio", "4", "--anchors_num_video", "6", "--kernel_sizes_audio", "5", "13",
               "--kernel_sizes_video", "1", "5", "--conv_layers_audio", "32", "32", "--conv_layers_video", "32", "32"]  # fmt: skip


def train_prop_argv(root: Path, n_train: int, n_val: int) -> list[str]:
    """train_prop at small sizes on a demo dataset of `n_train` / `n_val` videos under `root`, from a sample
    agent's encoder (--B 8, logs in root/log)."""
    demo = ensure_demo_dataset(root / "demo", seed=0, n_train=n_train, n_val=n_val)
    sample_checkpoint(root / "agent")
    o = demo.config_overrides()
    return [
        "--procedure", "train_prop", "--rl_pretrained_model_dir", str(root / "agent"),
        "--train_meta_path", o["train_meta_path"], "--val_1_meta_path", o["val_1_meta_path"],
        "--video_features_path", o["video_features_path"], "--audio_features_path", o["audio_features_path"],
        "--reference_paths", *o["reference_paths"], "--B", "8", "--prop_lr", "1e-3", "--device", "cpu",
        "--log_dir", str(root / "log"), *SMALL_HEADS,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("train_prop")
    return root, train_prop_argv(root, n_train=32, n_val=8)


@pytest.fixture(scope="module")
def three_epochs(setup) -> Path:
    root, argv = setup
    assert main([*argv, "--epoch_num", "3", "--exp_name", "full"]) == 0
    return root / "log" / "train_prop" / "full"


def agent_encoder(root: Path) -> dict[str, torch.Tensor]:
    """The agent's encoder in BMT's names (its M1 = video is the generator's M2)."""
    state = load_checkpoint(root / "agent" / "bm_hrl_agent.pt")
    swap = {"M1": "M2", "M2": "M1"}
    out = {}
    for key, value in state.items():
        if key.startswith("bm_enc.encoder.layers."):
            parts = key.split(".")
            stem, _, stream = parts[4].rpartition("_")
            parts[4] = f"{stem}_{swap[stream]}"
            out["encoder.encoder_AV." + ".".join(parts[2:])] = value
    return out


def test_frozen_encoder_is_bit_identical_and_the_heads_learn(setup, three_epochs):
    root, _ = setup
    best = load_bmt_file(three_epochs / "checkpoints" / "best_prop_model.pt")
    assert list(best) == [
        "config", "epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "anchors",
        "val_anet_metrics", "best_metric",
    ]  # fmt: skip
    encoder = agent_encoder(root)
    assert len(encoder) == sum(k.startswith("encoder.") for k in best["model_state_dict"])
    for key, value in encoder.items():
        assert torch.equal(best["model_state_dict"][key], value), key
    assert len(best["anchors"]["audio"]) == 4 and len(best["anchors"]["video"]) == 6
    metrics = json.loads((three_epochs / "metrics.json").read_text())
    losses = [e["train_loss"] for e in metrics["epochs"]]
    assert losses[-1] < 0.5 * losses[0]
    assert best["best_metric"] == metrics["best"]["val_1"][AVERAGE_KEY]["F1"] > 0


def test_best_checkpoint_reloads_to_the_proposals_of_its_epoch(setup, three_epochs):
    _, argv = setup
    best = load_bmt_file(three_epochs / "checkpoints" / "best_prop_model.pt")
    written = json.loads((three_epochs / f"prop_results_val_1_e{best['epoch']}_maxprop100.json").read_text())
    model, _ = load_proposal_generator(three_epochs / "checkpoints" / "best_prop_model.pt")
    cfg = config_from_argv(build_parser(), argv)
    cfg.device = "cpu"
    stores = open_stores(cfg)
    val = VideoDataset(videos_of(read_captions_csv(cfg.val_1_meta_path).segments), stores)
    assert propose(model, val, cfg) == written["results"]
    # the validation numbers are the official evaluator's detection half on that file
    with DenseCaptioningEvaluator(cfg.reference_paths, detection_only=True) as evaluator:
        assert evaluator.detection(written["results"]) == best["val_anet_metrics"]


def test_resume_continues_exactly(setup, three_epochs):
    root, argv = setup
    assert main([*argv, "--epoch_num", "2", "--exp_name", "part"]) == 0
    last = root / "log" / "train_prop" / "part" / "checkpoints" / "train_prop_last.pt"
    assert main([*argv, "--epoch_num", "3", "--resume", str(last)]) == 0
    full = load_checkpoint(three_epochs / "checkpoints" / "train_prop_last.pt")
    resumed = load_checkpoint(last)
    assert resumed["epoch"] == full["epoch"] == 3
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert resumed["metrics"] == full["metrics"]


@pytest.mark.slow
def test_finetuning_moves_the_encoder(setup):
    root, argv = setup
    assert main([*argv, "--epoch_num", "1", "--exp_name", "tuned", "--finetune_cap_encoder"]) == 0
    best = load_bmt_file(root / "log" / "train_prop" / "tuned" / "checkpoints" / "best_prop_model.pt")
    encoder = agent_encoder(root)
    assert any(not torch.equal(best["model_state_dict"][k], v) for k, v in encoder.items())


def test_bad_settings_are_one_line(setup, capsys):
    _, argv = setup
    assert main([*argv, "--kernel_sizes_audio", "4", "--dry_run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--kernel_sizes_audio" in err and len(err.splitlines()) == 1


def eval_argv(setup, *extra: str) -> list[str]:
    root, argv = setup
    data = argv[argv.index("--train_meta_path") :]
    return ["--procedure", "eval", *data, "--log_dir", str(root / "log"), *extra]


def test_eval_proposals_from_the_file_and_from_the_model_agree(setup, three_epochs, tmp_path):
    best = three_epochs / "checkpoints" / "best_prop_model.pt"
    epoch = load_bmt_file(best)["epoch"]
    file = three_epochs / f"prop_results_val_1_e{epoch}_maxprop100.json"
    for source in (["--proposals", str(file)], ["--prop_generator_model_path", str(best)]):
        out = tmp_path / "m.json"
        assert main(eval_argv(setup, "--task", "proposals", *source, "--metrics_out", str(out))) == 0
        assert json.loads(out.read_text()) == load_bmt_file(best)["val_anet_metrics"]


def test_eval_proposals_bad_file_is_one_line(setup, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"v_x": [{"timestamp": [0, 1]}]}))
    assert main(eval_argv(setup, "--task", "proposals", "--proposals", str(bad))) == 2
    *warnings, err = (
        capsys.readouterr().err.strip().splitlines()
    )  # eval warns of the train_prop flags it ignores
    assert "'results'" in err and all(w.startswith("main.py: warning: ") for w in warnings)


@requires_java
def test_captioning_on_learned_proposals(setup, three_epochs, tmp_path):
    root, _ = setup
    epoch = load_bmt_file(three_epochs / "checkpoints" / "best_prop_model.pt")["epoch"]
    file = three_epochs / f"prop_results_val_1_e{epoch}_maxprop100.json"
    out = tmp_path / "m.json"
    extra = [
        "--rl_pretrained_model_dir",
        str(root / "agent"),
        "--proposals",
        str(file),
        "--max_prop_per_vid",
        "3",
    ]
    assert (
        main(eval_argv(setup, "--task", "captioning", *extra, "--metrics_out", str(out), "--exp_name", "cap"))
        == 0
    )
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"0.3", "0.5", "0.7", "0.9", AVERAGE_KEY}
    assert {"METEOR", "SODA_c", "Precision", "Recall"} <= set(metrics[AVERAGE_KEY])
    captions = json.loads(
        (root / "log" / "eval" / "cap" / "captioning_results_learned_proposals.json").read_text()
    )
    proposals = json.loads(file.read_text())["results"]
    assert len(captions["results"]) == len(proposals) == 8
    for vid, rows in captions["results"].items():
        assert [r["timestamp"] for r in rows] == [p["timestamp"] for p in proposals[vid][:3]]


def test_uniform_grid_by_hand():
    videos = [Video("v", 20.0, [])]
    results = uniform_proposals(videos, [1.0, 2.0, 4.0, 8.0, 16.0], k=5)["v"]
    # m = ⌈√5⌉ = 3 lengths at ranks 0, 2, 4 (1, 4, 16 s) × ⌈5/3⌉ = 2 centres (5 s, 15 s), truncated to 5
    assert [r["timestamp"] for r in results] == [
        [4.5, 5.5],
        [14.5, 15.5],
        [3.0, 7.0],
        [13.0, 17.0],
        [0.0, 13.0],
    ]
    assert {r["proposal_score"] for r in results} == {1.0}


@pytest.mark.slow
def test_learned_proposals_beat_the_uniform_grid_over_three_seeds(tmp_path):
    """The demo's proposal part (DEMO_PROPOSALS) on the demo data, the encoder of a random small agent."""
    demo = ensure_demo_dataset(tmp_path / "demo")
    sample_checkpoint(tmp_path / "agent")
    for seed in (0, 1, 2):
        argv = [
            "--procedure",
            "demo",
            "--seed",
            str(seed),
            "--device",
            "cpu",
            "--log_dir",
            str(tmp_path / "log"),
        ]
        cfg = config_from_argv(build_parser(), [*argv, "--exp_name", f"s{seed}"])
        for key, value in demo.config_overrides().items():
            setattr(cfg, key, value)
        seed_everything(seed)
        metrics = proposals_demo(
            cfg, RunDir(tmp_path / "log" / f"s{seed}", cfg), tmp_path / "agent", captions=False
        )
        learned, uniform = metrics["proposals/learned"], metrics["proposals/uniform"]
        assert set(learned) == {"precision", "recall", "F1"}
        assert learned["F1"] > uniform["F1"] + 0.05, (seed, learned, uniform)


def test_agent_encoder_maps_onto_the_generator_encoder(setup):
    """Our agent's encoder (M1 = video) under BMT's names (M1 = audio) computes the same streams."""
    root, argv = setup
    cfg = config_from_argv(build_parser(), argv)
    sizes, weights = encoder_from_captioning(cfg)
    model = ProposalGenerator(replace(sizes, anchors={"audio": (1.0,), "video": (2.0,)}))
    model.encoder.load_state_dict(weights)
    agent = sample_checkpoint(root / "agent_copy").agent.eval()
    torch.manual_seed(0)
    video, audio = torch.randn(2, 7, 1024), torch.randn(2, 11, 128)
    v_mask = torch.ones(2, 1, 7, dtype=torch.bool)
    a_mask = torch.arange(11)[None, None] < torch.tensor([11, 6])[:, None, None]
    Va, Av = agent.bm_enc(video, audio, v_mask, a_mask)
    Av2, Va2 = model.encoder.eval()(audio, video, a_mask, v_mask)
    assert torch.equal(Va, Va2) and torch.equal(Av, Av2)


def test_encoder_from_bmt_captioning_checkpoint(tmp_path, monkeypatch):
    """BMT's best_cap_model.pt: a pickled Config, `module.`-prefixed keys, the encoder under encoder.encoder_AV."""
    small = ProposalConfig(
        d_model=16, H=2, N=1, d_ff_vid=24, d_ff_aud=12, anchors={"audio": (1.0,), "video": (2.0,)}
    )
    source = ProposalGenerator(small)
    module = types.ModuleType("utilities.config_constructor")
    Config = type("Config", (), {"__module__": "utilities.config_constructor"})
    module.Config = Config
    config = Config()
    config.__dict__.update({"d_model_video": 1024, "d_model_audio": 128, "d_model": 16, "H": 2, "N": 1,
                            "d_ff_video": 24, "d_ff_audio": 12, "device": "cuda:0"})  # fmt: skip
    weights = {f"module.{k}": v for k, v in source.encoder.state_dict(prefix="encoder.").items()}
    weights["module.decoder.layers.0.w"] = torch.zeros(3)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "utilities.config_constructor", module)
        torch.save(
            {"config": config, "model_state_dict": weights},
            tmp_path / "cap.pt",
            _use_new_zipfile_serialization=False,
        )
    cfg = config_from_argv(
        build_parser(), ["--procedure", "train_prop", "--pretrained_cap_model_path", str(tmp_path / "cap.pt")]
    )
    sizes, loaded = encoder_from_captioning(cfg)
    assert (sizes.d_model, sizes.d_ff_vid, sizes.d_ff_aud, sizes.N) == (16, 24, 12, 1)
    target = ProposalGenerator(replace(sizes, anchors=small.anchors))
    target.encoder.load_state_dict(loaded)
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(target.encoder.state_dict()[key], value)


def test_a_captioning_checkpoint_without_an_encoder_size_is_one_line(tmp_path):
    """A best_cap_model.pt whose config lacks a size field names the file and the field (no KeyError)."""
    torch.save(
        {"config": {"d_model_video": 1024, "d_model_audio": 128}, "model_state_dict": {}}, tmp_path / "c.pt"
    )
    cfg = config_from_argv(
        build_parser(), ["--procedure", "train_prop", "--pretrained_cap_model_path", str(tmp_path / "c.pt")]
    )
    with pytest.raises(InputError, match=r"c\.pt: its config has no 'd_model'"):
        encoder_from_captioning(cfg)
